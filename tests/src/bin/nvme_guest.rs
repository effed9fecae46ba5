//! The NVMe guest tests: run inside the QEMU guest that tests/qemu/run.sh boots, with the
//! emulated NVMe controllers bound to vfio-pci. Usage: `nvme-guest PCI_ADDR_P PCI_ADDR_S`.
//!
//! Each test prints `ok - NAME` or `not ok - NAME: why`; the last line is `N passed, N failed`
//! and the exit code is 1 when anything failed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drivers::nvme::{rpc::attach_pci, ControllerOptions};
use drivers::{Bdev, ChannelContext, IoBufs, IoChannel, IoCompletion, IoError, IoRequest};
use drivers::{SubmitErrorKind, SubmitResult};
use engine::app::Engine;
use engine::pair::channel::View;
use engine::reactor::{IdlePolicy, ReactorOptions};
use hugepages::BufferPool;
use serde_json::{json, Value};
use smallvec::smallvec;

type Outcome = Result<(), String>;

/// The byte at `offset` of the pattern written with `seed`.
fn pattern(seed: u64, offset: u64) -> u8 {
    let x = (offset / 8)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(seed.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    (x >> ((offset % 8) * 8) >> 3) as u8 ^ (seed as u8)
}

fn fill(buf: &mut hugepages::DmaBuf, seed: u64, device_offset: u64) {
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = pattern(seed, device_offset + i as u64);
    }
}

/// Submits and polls until the request completes (retrying while the queue is full).
fn run_one(ch: &mut dyn IoChannel, req: IoRequest) -> Result<IoCompletion, String> {
    submit_retrying(ch, req)?;
    let mut out = Vec::new();
    let start = Instant::now();
    while out.is_empty() {
        ch.poll(&mut out);
        if start.elapsed() > Duration::from_secs(60) {
            return Err("no completion within 60 s".into());
        }
    }
    Ok(out.remove(0))
}

fn submit_retrying(ch: &mut dyn IoChannel, mut req: IoRequest) -> Result<(), String> {
    loop {
        let r: SubmitResult = ch.submit(req);
        match r {
            Ok(()) => return Ok(()),
            Err(e) if e.error == SubmitErrorKind::QueueFull => {
                req = e.req;
                let mut sink = Vec::new();
                ch.poll(&mut sink);
                if !sink.is_empty() {
                    return Err("unexpected completion while retrying".into());
                }
            }
            Err(e) => return Err(format!("submit refused: {:?}", e.error)),
        }
    }
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Outcome {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// Driver-level checks on one controller: identify, single- and multi-page I/O, SGL-shaped
/// buffers, the driver's and the controller's range checks, detach and attach again.
fn raw_controller(addr: &str) -> Outcome {
    let options = ControllerOptions {
        io_timeout: Duration::from_secs(10),
        ..ControllerOptions::default()
    };
    let bdevs = attach_pci("raw", addr, options).map_err(|e| format!("attach: {e}"))?;
    let ns = &bdevs[0];
    let ctrl = ns.controller();
    println!(
        "# {addr}: model '{}', serial '{}', firmware '{}', NVMe {}.{}, {} namespace(s), {} blocks of {} bytes, max transfer {} bytes, SGL {}",
        ctrl.identify().model,
        ctrl.identify().serial,
        ctrl.identify().firmware,
        ctrl.version() >> 16,
        (ctrl.version() >> 8) & 0xff,
        bdevs.len(),
        ns.geometry().num_blocks,
        ns.geometry().block_size,
        ctrl.max_transfer(),
        ctrl.identify().supports_sgl()
    );
    check(ns.name() == "rawn1", || {
        format!("first namespace named {}", ns.name())
    })?;
    check(ctrl.identify().model.contains("QEMU"), || {
        format!("model {:?}", ctrl.identify().model)
    })?;
    let g = ns.geometry();
    let bs = g.block_size as u64;
    let mut ch = ns
        .open_nvme_channel(&ChannelContext::default())
        .map_err(|e| format!("channel: {e}"))?;
    let pool = BufferPool::new(1 << 20, 6).map_err(|e| e.to_string())?;
    let get = |len: usize| -> Result<hugepages::DmaBuf, String> {
        let mut b = pool.get().ok_or("pool empty")?;
        b.set_len(len).map_err(|e| e.to_string())?;
        Ok(b)
    };
    // Single page, then 1 MiB in one buffer (PRP list, cut at the transfer limit), then a
    // vectored request of three buffers.
    let cases: Vec<(u64, Vec<usize>)> = vec![
        (0, vec![4096]),
        (8 << 20, vec![1 << 20]),
        (16 << 20, vec![65536, 131072, 4096]),
    ];
    for (seed, (offset, lens)) in cases.iter().enumerate() {
        let mut bufs = IoBufs::new();
        let mut at = *offset;
        for &len in lens {
            let mut b = get(len)?;
            fill(&mut b, seed as u64 + 1, at);
            at += len as u64;
            bufs.push(b);
        }
        let c = run_one(&mut ch, IoRequest::write(*offset, bufs, 1))?;
        check(c.result.is_ok(), || {
            format!("write at {offset}: {:?}", c.result)
        })?;
        drop(c);
        let mut back = IoBufs::new();
        for &len in lens {
            let mut b = get(len)?;
            b.as_mut_slice().fill(0x5a);
            back.push(b);
        }
        let c = run_one(&mut ch, IoRequest::read(*offset, back, 2))?;
        check(c.result.is_ok(), || {
            format!("read at {offset}: {:?}", c.result)
        })?;
        let mut at = *offset;
        for b in &c.bufs {
            for (i, &x) in b.as_slice().iter().enumerate() {
                if x != pattern(seed as u64 + 1, at + i as u64) {
                    return Err(format!(
                        "byte {} of the request at {offset} differs",
                        at + i as u64 - offset
                    ));
                }
            }
            at += b.len() as u64;
        }
    }
    // Block-sized buffers that are not page-shaped: SGLs when the controller has them.
    if bs < 4096 && ctrl.identify().supports_sgl() {
        let mut bufs = IoBufs::new();
        for i in 0..3 {
            let mut b = get(bs as usize)?;
            fill(&mut b, 7, 4096 + i * bs);
            bufs.push(b);
        }
        let c = run_one(&mut ch, IoRequest::write(4096, bufs, 3))?;
        check(c.result.is_ok(), || format!("SGL write: {:?}", c.result))?;
        let back = get(3 * bs as usize)?;
        let c = run_one(&mut ch, IoRequest::read(4096, smallvec![back], 4))?;
        let ok = c.bufs[0]
            .as_slice()
            .iter()
            .enumerate()
            .all(|(i, &x)| x == pattern(7, 4096 + i as u64));
        check(ok, || "SGL write read back differently".into())?;
        println!("# SGL-described write of {} buffers verified", 3);
    }
    // Past the end: the driver refuses; sent anyway, the controller answers LBA out of range.
    let end = g.size();
    let err = ch
        .submit(IoRequest::read(end, smallvec![get(4096)?], 5))
        .err()
        .ok_or("a read past the end was accepted")?;
    check(
        matches!(
            err.error,
            SubmitErrorKind::Invalid(IoError::OutOfRange { .. })
        ),
        || format!("driver said {:?}", err.error),
    )?;
    ch.submit_unchecked(IoRequest::read(end, smallvec![get(4096)?], 6))
        .map_err(|e| format!("unchecked submit: {:?}", e.error))?;
    let mut out = Vec::new();
    let start = Instant::now();
    while out.is_empty() && start.elapsed() < Duration::from_secs(30) {
        ch.poll(&mut out);
    }
    let c = out.pop().ok_or("no completion for the out-of-range read")?;
    check(c.result == Err(IoError::Device(libc::ERANGE)), || {
        format!("controller said {:?}", c.result)
    })?;
    drop(ch);
    drop(bdevs);
    // Detached: the device can be opened again.
    let again = attach_pci("raw", addr, options).map_err(|e| format!("re-attach: {e}"))?;
    check(again.len() == 1, || "namespaces after re-attach".into())
}

fn rpc(engine: &Engine, method: &str, params: Value) -> Result<Value, String> {
    engine::rpc::methods::call(engine, method, params)
        .map_err(|e| format!("{method}: {} ({})", e.message, e.code))
}

/// Opens a channel on reactor `r` and runs `f` with it there.
fn on_reactor<R: Send + 'static>(
    engine: &Engine,
    r: usize,
    bdev: Arc<dyn Bdev>,
    f: impl FnOnce(&mut dyn IoChannel) -> Result<R, String> + Send + 'static,
) -> Result<R, String> {
    engine
        .reactors()
        .get(r)
        .call(move |cx| {
            let ctx = cx.channel_context(64);
            let mut ch = bdev
                .open_channel(&ctx)
                .map_err(|e| format!("channel: {e}"))?;
            f(ch.as_mut())
        })
        .map_err(|e| e.to_string())?
}

/// Chunks of the two-reactor test: (offset, length, seed); reactor `r` writes those with
/// index % 2 == r.
fn chunks() -> Vec<(u64, u64, u64)> {
    let sizes = [4096u64, 8192, 65536, 131072, 4096, 524288, 12288, 1 << 20];
    let mut out = Vec::new();
    let mut at = 0;
    for i in 0..48 {
        let len = sizes[i % sizes.len()];
        out.push((at, len, 100 + i as u64));
        at += len;
    }
    out
}

/// Writes chunks in flight together (up to `qd`), then reads every chunk back and compares
/// with the model.
fn write_then_verify(
    ch: &mut dyn IoChannel,
    mine: Vec<(u64, u64, u64)>,
    all: Vec<(u64, u64, u64)>,
    verify: bool,
) -> Result<usize, String> {
    let pool = BufferPool::new(1 << 20, 16).map_err(|e| e.to_string())?;
    let mut inflight = 0;
    let mut out: Vec<IoCompletion> = Vec::new();
    let mut failures = Vec::new();
    let drain = |ch: &mut dyn IoChannel,
                 out: &mut Vec<IoCompletion>,
                 failures: &mut Vec<String>,
                 inflight: &mut usize,
                 until: usize| {
        let start = Instant::now();
        while *inflight > until {
            ch.poll(out);
            for c in out.drain(..) {
                *inflight -= 1;
                if let Err(e) = c.result {
                    failures.push(format!("tag {}: {e}", c.tag));
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                failures.push("completions stopped".into());
                return;
            }
        }
    };
    if !verify {
        for (offset, len, seed) in &mine {
            let mut b = pool.get().ok_or("pool")?;
            b.set_len(*len as usize).map_err(|e| e.to_string())?;
            fill(&mut b, *seed, *offset);
            submit_retrying(ch, IoRequest::write(*offset, smallvec![b], *seed))?;
            inflight += 1;
            drain(ch, &mut out, &mut failures, &mut inflight, 8);
        }
        drain(ch, &mut out, &mut failures, &mut inflight, 0);
        return if failures.is_empty() {
            Ok(mine.len())
        } else {
            Err(failures.join("; "))
        };
    }
    let mut checked = 0;
    for (offset, len, seed) in &all {
        let mut b = pool.get().ok_or("pool")?;
        b.set_len(*len as usize).map_err(|e| e.to_string())?;
        let c = run_one(ch, IoRequest::read(*offset, smallvec![b], *seed))?;
        c.result.map_err(|e| format!("read at {offset}: {e}"))?;
        let bad = c.bufs[0]
            .as_slice()
            .iter()
            .enumerate()
            .position(|(i, &x)| x != pattern(*seed, offset + i as u64));
        if let Some(i) = bad {
            return Err(format!(
                "chunk at {offset} (seed {seed}) differs at byte {i}"
            ));
        }
        checked += 1;
    }
    Ok(checked)
}

fn two_reactors(engine: &Arc<Engine>) -> Outcome {
    let all = chunks();
    let mut handles = Vec::new();
    for r in 0..2usize {
        let mine: Vec<_> = all
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| i % 2 == r)
            .map(|(_, c)| c)
            .collect();
        let (engine, all) = (Arc::clone(engine), all.clone());
        handles.push(std::thread::spawn(move || {
            let bdev = engine
                .state()
                .bdevs
                .get("nvme0n1")
                .map_err(|e| e.to_string())?;
            on_reactor(&engine, r, bdev, move |ch| {
                write_then_verify(ch, mine, all, false)
            })
        }));
    }
    for h in handles {
        h.join().map_err(|_| "writer thread panicked")??;
    }
    // Each reactor reads everything, including what the other one wrote.
    for r in 0..2usize {
        let bdev = engine
            .state()
            .bdevs
            .get("nvme0n1")
            .map_err(|e| e.to_string())?;
        let all2 = all.clone();
        let n = on_reactor(engine, r, bdev, move |ch| {
            write_then_verify(ch, Vec::new(), all2, true)
        })?;
        check(n == all.len(), || format!("reactor {r} checked {n} chunks"))?;
    }
    println!(
        "# {} chunks ({} bytes) written from two reactors and read back on each",
        all.len(),
        all.iter().map(|c| c.1).sum::<u64>()
    );
    Ok(())
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool, String>) -> Outcome {
    let start = Instant::now();
    while !f()? {
        if start.elapsed() > limit {
            return Err(format!("{what}: not within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A pair of namespaces of the two controllers, split and backed up to a tape file; the tape
/// restores to exactly P at the split.
fn pair_backup(engine: &Arc<Engine>, quicksplit: &Path) -> Outcome {
    let image_len: u64 = chunks().iter().map(|c| c.0 + c.1).max().unwrap_or(0);
    rpc(
        engine,
        "pair_create",
        json!({"name": "pp", "primary": "nvme0n1", "secondary": "nvme1n1"}),
    )?;
    wait_until("initial copy", Duration::from_secs(300), || {
        Ok(rpc(engine, "pair_get", json!({"name": "pp"}))?[0]["state"] == "PAIR")
    })?;
    let split = rpc(engine, "pair_split", json!({"name": "pp"}))?;
    println!("# split: {split}");
    // Writes to P after the split must not reach the backup.
    let view = engine
        .pair_view("pp", View::Primary)
        .map_err(|e| e.to_string())?;
    // On reactor 0: this closure polls until its write completes, and the write waits for the
    // pair's metadata writer, which runs next to the copier on reactor 1.
    on_reactor(engine, 0, view, move |ch| {
        let pool = BufferPool::new(65536, 2).map_err(|e| e.to_string())?;
        let mut b = pool.get().ok_or("pool")?;
        b.as_mut_slice().fill(0xee);
        let c = run_one(ch, IoRequest::write(0, smallvec![b], 1))?;
        c.result.map_err(|e| e.to_string())
    })?;
    let tape = Path::new("/tmp/pp.tar");
    let id = rpc(
        engine,
        "backup_start",
        json!({"pair": "pp", "target": {"type": "tape", "path": tape}}),
    )?["id"]
        .clone();
    let mut info = Value::Null;
    wait_until("backup", Duration::from_secs(300), || {
        info = rpc(engine, "backup_get", json!({"id": id}))?[0].clone();
        match info["state"].as_str() {
            Some("running") => Ok(false),
            Some("done") => Ok(true),
            _ => Err(format!("backup ended: {info}")),
        }
    })?;
    println!(
        "# backup: {} bytes, digest {}",
        info["bytes_done"], info["digest"]
    );
    // The pair's queues ask for MSI-X vectors that signal their reactors (which may park).
    let irqs = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    for line in irqs.lines().filter(|l| l.contains("vfio-msix")) {
        println!(
            "# irq {}",
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    let restored = Path::new("/tmp/pp-restored.img");
    let out = std::process::Command::new(quicksplit)
        .arg("restore")
        .arg(tape)
        .arg("--to")
        .arg(restored)
        .output()
        .map_err(|e| format!("run quicksplit restore: {e}"))?;
    print!("# {}", String::from_utf8_lossy(&out.stdout));
    check(out.status.success(), || {
        format!(
            "quicksplit restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let img = std::fs::read(restored).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(restored);
    let _ = std::fs::remove_file(tape);
    let size = engine
        .state()
        .bdevs
        .get("nvme0n1")
        .map_err(|e| e.to_string())?
        .geometry()
        .size();
    check(img.len() as u64 == size, || {
        format!("restored {} bytes of {size}", img.len())
    })?;
    // P at the split: the chunks of the two-reactor test, zeroes beyond them.
    let mut expect = vec![0u8; image_len as usize];
    for (offset, len, seed) in chunks() {
        for i in offset..(offset + len).min(image_len) {
            expect[i as usize] = pattern(seed, i);
        }
    }
    check(img[..image_len as usize] == expect[..], || {
        "restored image differs from P at the split".into()
    })?;
    check(img[image_len as usize..].iter().all(|&b| b == 0), || {
        "restored image has data past the pattern".into()
    })?;
    rpc(engine, "pair_delete", json!({"name": "pp"}))?;
    Ok(())
}

fn engine_tests(
    addrs: &[String],
    quicksplit: &Path,
    results: &mut Vec<(String, Outcome)>,
) -> Outcome {
    let opts = ReactorOptions {
        cores: vec![0, 1],
        idle: IdlePolicy::Adaptive,
        inbox_size: 1024,
    };
    let engine = Engine::start(&opts, Path::new("/tmp/qs-state")).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let r = rpc(
            &engine,
            "bdev_nvme_attach_controller",
            json!({"name": format!("nvme{i}"), "pci_addr": addr}),
        )?;
        names.push(r);
    }
    let attach = check(
        names == vec![json!(["nvme0n1"]), json!(["nvme1n1"])],
        || format!("attach gave {names:?}"),
    )
    .and_then(|()| {
        let list = rpc(&engine, "bdev_get_bdevs", json!({}))?;
        check(
            list.as_array()
                .is_some_and(|l| l.len() == 2 && l.iter().all(|b| b["driver"] == "nvme")),
            || format!("bdevs: {list}"),
        )
    })
    .and_then(|()| {
        let again = rpc(
            &engine,
            "bdev_nvme_attach_controller",
            json!({"name": "nvme0", "pci_addr": addrs[0]}),
        );
        check(again.is_err(), || {
            "a second attach under the same name succeeded".into()
        })
    });
    results.push(("attach controllers over RPC".into(), attach));
    results.push(("patterns from two reactors".into(), two_reactors(&engine)));
    results.push((
        "pair split and tape backup".into(),
        pair_backup(&engine, quicksplit),
    ));
    let detach = (|| {
        let refused = rpc(&engine, "bdev_delete", json!({"name": "nvme0n1"}));
        check(refused.is_err(), || {
            "bdev_delete removed a namespace".into()
        })?;
        for i in 0..addrs.len() {
            rpc(
                &engine,
                "bdev_nvme_detach_controller",
                json!({"name": format!("nvme{i}")}),
            )?;
        }
        let list = rpc(&engine, "bdev_get_bdevs", json!({}))?;
        check(list == json!([]), || format!("bdevs left: {list}"))
    })();
    results.push(("detach controllers over RPC".into(), detach));
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        eprintln!("usage: nvme-guest PCI_ADDR_P PCI_ADDR_S");
        std::process::exit(2);
    }
    let quicksplit = std::env::var("QUICKSPLIT").unwrap_or_else(|_| "/bin/quicksplit".into());
    let mut results: Vec<(String, Outcome)> = Vec::new();
    // On the secondary's controller: the pair's initial copy overwrites what this writes.
    results.push((
        "identify, multi-page I/O and range errors on one controller".into(),
        raw_controller(&args[1]),
    ));
    if let Err(e) = engine_tests(&args, Path::new(&quicksplit), &mut results) {
        results.push(("engine start".into(), Err(e)));
    }
    let mut failed = 0;
    for (name, r) in &results {
        match r {
            Ok(()) => println!("ok - {name}"),
            Err(e) => {
                failed += 1;
                println!("not ok - {name}: {e}");
            }
        }
    }
    println!("{} passed, {} failed", results.len() - failed, failed);
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
