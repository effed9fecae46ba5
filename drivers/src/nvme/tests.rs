//! Host tests of the driver against the controller model: bring-up, commands and data pointers
//! on the wire, data through PRP lists and SGLs, phase tags across many wraps, queue full,
//! errors, timeouts with abort, and recovery from a fatal status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hugepages::{BufferPool, DmaBuf};
use smallvec::smallvec;

use super::datapath::{self, DataError, Segment};
use super::model::{Model, ModelConfig};
use super::spec::{self, Capabilities, Command, Completion, DataPointer, Status};
use super::{Controller, ControllerOptions, NvmeBdev, NvmeChannel, NvmeError};
use crate::bdev::{
    Bdev, ChannelContext, IoBufs, IoChannel, IoCompletion, IoError, IoOp, IoRequest,
    SubmitErrorKind,
};

fn start(cfg: ModelConfig, options: ControllerOptions) -> (Arc<Model>, NvmeBdev) {
    let model = Arc::new(Model::new(cfg));
    let (ctrl, namespaces) =
        Controller::start("m", Arc::clone(&model) as Arc<dyn super::Device>, options)
            .expect("controller starts");
    let mut bdevs = NvmeBdev::for_namespaces(&ctrl, &namespaces, serde_json::json!({}));
    (model, bdevs.remove(0))
}

fn channel(bdev: &NvmeBdev) -> NvmeChannel {
    bdev.open_nvme_channel(&ChannelContext::default())
        .expect("channel opens")
}

fn filled(pool: &BufferPool, seed: u8, len: usize) -> DmaBuf {
    let mut b = pool.get().expect("a free buffer");
    b.set_len(len).expect("len fits");
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = seed.wrapping_add((i / 512) as u8).wrapping_mul(31) ^ (i as u8);
    }
    b
}

fn wait(ch: &mut NvmeChannel, n: usize) -> Vec<IoCompletion> {
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < n {
        ch.poll(&mut out);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "completions did not come"
        );
        std::thread::yield_now();
    }
    out
}

fn run(ch: &mut NvmeChannel, req: IoRequest) -> IoCompletion {
    ch.submit(req).expect("submitted");
    wait(ch, 1).remove(0)
}

#[test]
fn brings_up_the_controller_and_identifies_the_namespace() {
    let (model, bdev) = start(ModelConfig::default(), ControllerOptions::default());
    assert_eq!(bdev.name(), "mn1");
    assert_eq!(bdev.geometry().block_size, 4096);
    assert_eq!(bdev.geometry().num_blocks, 1024);
    let ident = bdev.controller().identify();
    assert_eq!(ident.model, "quicksplit controller model");
    assert_eq!(ident.serial, "MODEL-SERIAL");
    assert!(ident.supports_sgl());
    assert_eq!(model.enables(), 1);
    // mdts 5 with 4 KiB pages: 128 KiB per command.
    assert_eq!(bdev.controller().max_transfer(), 128 << 10);
}

#[test]
fn a_controller_that_never_gets_ready_times_out() {
    let cfg = ModelConfig {
        never_ready: true,
        ..ModelConfig::default()
    };
    let model = Arc::new(Model::new(cfg));
    let err = Controller::start(
        "m",
        model as Arc<dyn super::Device>,
        ControllerOptions::default(),
    )
    .expect_err("no ready controller");
    assert!(
        matches!(
            err,
            NvmeError::Timeout {
                what: "controller enable",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn writes_and_reads_back_single_and_multi_page_buffers() {
    let (model, bdev) = start(ModelConfig::default(), ControllerOptions::default());
    let mut ch = channel(&bdev);
    let pool = BufferPool::new(64 << 10, 8).expect("pool");
    // One page: PRP1 only.
    let c = run(
        &mut ch,
        IoRequest::write(0, smallvec![filled(&pool, 1, 4096)], 1),
    );
    assert_eq!(c.result, Ok(()));
    // Two pages: PRP1 and PRP2. Sixteen pages: PRP list.
    let c = run(
        &mut ch,
        IoRequest::write(8192, smallvec![filled(&pool, 2, 8192)], 2),
    );
    assert_eq!(c.result, Ok(()));
    let c = run(
        &mut ch,
        IoRequest::write(65536, smallvec![filled(&pool, 3, 65536)], 3),
    );
    assert_eq!(c.result, Ok(()));
    let cmds = model.io_commands();
    let prp = |i: usize| match cmds[i].data() {
        DataPointer::Prp(a, b) => (a, b),
        other => panic!("not a PRP: {other:?}"),
    };
    assert_eq!(prp(0).1, 0);
    assert_eq!(prp(1).1, prp(1).0 + 4096);
    assert_ne!(prp(2).1, prp(2).0 + 4096, "sixteen pages go through a list");
    for (offset, seed, len) in [(0u64, 1u8, 4096usize), (8192, 2, 8192), (65536, 3, 65536)] {
        let want = filled(&pool, seed, len);
        assert_eq!(model.disk(offset as usize, len), want.as_slice());
        let mut back = pool.get().expect("buffer");
        back.set_len(len).expect("len");
        back.as_mut_slice().fill(0xee);
        let c = run(&mut ch, IoRequest::read(offset, smallvec![back], 9));
        assert_eq!(c.result, Ok(()));
        assert_eq!(c.bufs[0].as_slice(), want.as_slice());
    }
}

#[test]
fn vectored_requests_and_requests_beyond_the_transfer_limit() {
    let cfg = ModelConfig {
        mdts: 1,
        ..ModelConfig::default()
    };
    let (model, bdev) = start(cfg, ControllerOptions::default());
    let mut ch = channel(&bdev);
    let pool = BufferPool::new(12288, 8).expect("pool");
    // 36 KiB in three buffers, 8 KiB per command: five commands, cut across buffer joins.
    let bufs: IoBufs = smallvec![
        filled(&pool, 10, 12288),
        filled(&pool, 11, 12288),
        filled(&pool, 12, 12288)
    ];
    let expect: Vec<u8> = bufs.iter().flat_map(|b| b.as_slice().to_vec()).collect();
    let c = run(&mut ch, IoRequest::write(4096 * 10, bufs, 1));
    assert_eq!(c.result, Ok(()));
    assert_eq!(model.io_commands().len(), 5);
    assert!(model.io_commands().iter().all(|c| c.range().1 <= 2));
    assert_eq!(model.disk(4096 * 10, expect.len()), expect);
    let back: IoBufs = (0..3).map(|_| pool.get().expect("buffer")).collect();
    let c = run(&mut ch, IoRequest::read(4096 * 10, back, 2));
    let got: Vec<u8> = c.bufs.iter().flat_map(|b| b.as_slice().to_vec()).collect();
    assert_eq!(got, expect);
}

#[test]
fn buffers_that_are_not_page_shaped_use_sgls_or_are_refused() {
    for sgl in [true, false] {
        let cfg = ModelConfig {
            block_size: 512,
            sgl,
            ..ModelConfig::default()
        };
        let (model, bdev) = start(cfg, ControllerOptions::default());
        let mut ch = channel(&bdev);
        let pool = BufferPool::new(4096, 4).expect("pool");
        let bufs: IoBufs = smallvec![filled(&pool, 20, 512), filled(&pool, 21, 1024)];
        let expect: Vec<u8> = bufs.iter().flat_map(|b| b.as_slice().to_vec()).collect();
        let req = IoRequest::write(512 * 3, bufs, 1);
        if !sgl {
            let err = ch.submit(req).expect_err("refused");
            assert!(matches!(
                err.error,
                SubmitErrorKind::Invalid(IoError::Refused(_))
            ));
            assert_eq!(err.req.bufs.len(), 2, "the request comes back whole");
            assert_eq!(ch.in_flight(), 0);
            continue;
        }
        let c = run(&mut ch, req);
        assert_eq!(c.result, Ok(()));
        assert!(matches!(model.io_commands()[0].data(), DataPointer::Sgl(_)));
        assert_eq!(model.disk(512 * 3, 1536), expect);
    }
}

#[test]
fn phase_tags_hold_across_many_wraps_of_a_small_queue() {
    let options = ControllerOptions {
        io_queue_entries: 4,
        ..ControllerOptions::default()
    };
    let (model, bdev) = start(ModelConfig::default(), options);
    let mut ch = channel(&bdev);
    let pool = BufferPool::new(4096, 8).expect("pool");
    // Three commands fit at once; keep the queue full for 40 rounds.
    for round in 0..40u64 {
        for i in 0..3u64 {
            let block = (round * 3 + i) % 1024;
            let req = IoRequest::write(
                block * 4096,
                smallvec![filled(&pool, (round + i) as u8, 4096)],
                i,
            );
            ch.submit(req).expect("room for three");
        }
        let extra = IoRequest::write(0, smallvec![filled(&pool, 0, 4096)], 99);
        let full = ch.submit(extra).expect_err("queue full");
        assert_eq!(full.error, SubmitErrorKind::QueueFull);
        let done = wait(&mut ch, 3);
        assert!(done.iter().all(|c| c.result.is_ok()));
        let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        tags.sort();
        assert_eq!(tags, vec![0, 1, 2]);
    }
    assert_eq!(model.io_commands().len(), 120);
    let last = 39 * 3 + 2;
    assert_eq!(
        model.disk(last as usize * 4096, 4096),
        filled(&pool, 41, 4096).as_slice()
    );
}

#[test]
fn out_of_range_requests_fail_in_the_driver_and_in_the_controller() {
    let (_model, bdev) = start(ModelConfig::default(), ControllerOptions::default());
    let mut ch = channel(&bdev);
    let pool = BufferPool::new(8192, 4).expect("pool");
    let req = IoRequest::read(1023 * 4096, smallvec![pool.get().expect("buffer")], 1);
    let err = ch.submit(req).expect_err("beyond the end");
    assert!(matches!(
        err.error,
        SubmitErrorKind::Invalid(IoError::OutOfRange { .. })
    ));
    let req = IoRequest::read(1023 * 4096, smallvec![pool.get().expect("buffer")], 2);
    ch.submit_unchecked(req).expect("submitted");
    let c = wait(&mut ch, 1).remove(0);
    assert_eq!(c.result, Err(IoError::Device(libc::ERANGE)));
    assert_eq!(c.bufs.len(), 1, "the buffer comes back");
}

#[test]
fn write_zeroes_unmap_and_flush() {
    let (model, bdev) = start(ModelConfig::default(), ControllerOptions::default());
    let mut ch = channel(&bdev);
    let pool = BufferPool::new(16384, 2).expect("pool");
    assert_eq!(
        run(
            &mut ch,
            IoRequest::write(0, smallvec![filled(&pool, 5, 16384)], 1)
        )
        .result,
        Ok(())
    );
    let z = IoRequest::without_data(IoOp::WriteZeroes { deallocate: false }, 4096, 4096, 2);
    assert_eq!(run(&mut ch, z).result, Ok(()));
    let u = IoRequest::without_data(IoOp::Unmap, 12288, 4096, 3);
    assert_eq!(run(&mut ch, u).result, Ok(()));
    assert_eq!(
        run(&mut ch, IoRequest::without_data(IoOp::Flush, 0, 0, 4)).result,
        Ok(())
    );
    let disk = model.disk(0, 16384);
    let want = filled(&pool, 5, 16384);
    assert_eq!(&disk[..4096], &want.as_slice()[..4096]);
    assert!(disk[4096..8192].iter().all(|&b| b == 0));
    assert_eq!(&disk[8192..12288], &want.as_slice()[8192..12288]);
    assert!(disk[12288..].iter().all(|&b| b == 0));
}

fn short_timeouts() -> ControllerOptions {
    ControllerOptions {
        io_timeout: Duration::from_millis(100),
        ..ControllerOptions::default()
    }
}

#[test]
fn a_command_that_times_out_is_aborted() {
    let (model, bdev) = start(ModelConfig::default(), short_timeouts());
    let mut ch = channel(&bdev);
    let pool = BufferPool::new(4096, 4).expect("pool");
    model.swallow(1, true);
    ch.submit(IoRequest::read(
        0,
        smallvec![pool.get().expect("buffer")],
        7,
    ))
    .expect("submitted");
    let c = wait(&mut ch, 1).remove(0);
    assert_eq!(c.tag, 7);
    assert!(
        matches!(&c.result, Err(IoError::Aborted(m)) if m.contains("timed out")),
        "{:?}",
        c.result
    );
    assert_eq!(model.enables(), 1, "no reset was needed");
    let c = run(
        &mut ch,
        IoRequest::write(0, smallvec![filled(&pool, 3, 4096)], 8),
    );
    assert_eq!(c.result, Ok(()));
}

#[test]
fn a_command_the_abort_cannot_end_resets_the_controller() {
    let (model, bdev) = start(ModelConfig::default(), short_timeouts());
    let mut ch = channel(&bdev);
    let mut other = channel(&bdev);
    let pool = BufferPool::new(4096, 8).expect("pool");
    model.swallow(1, false);
    ch.submit(IoRequest::read(
        0,
        smallvec![pool.get().expect("buffer")],
        1,
    ))
    .expect("submitted");
    let c = wait(&mut ch, 1).remove(0);
    assert!(
        matches!(&c.result, Err(IoError::Aborted(m)) if m.contains("reset")),
        "{:?}",
        c.result
    );
    assert_eq!(model.enables(), 2, "the controller was reset");
    // Both queue pairs were created again and carry I/O.
    let c = run(
        &mut ch,
        IoRequest::write(0, smallvec![filled(&pool, 4, 4096)], 2),
    );
    assert_eq!(c.result, Ok(()));
    let c = run(
        &mut other,
        IoRequest::read(0, smallvec![pool.get().expect("buffer")], 3),
    );
    assert_eq!(c.result, Ok(()));
    assert_eq!(c.bufs[0].as_slice(), filled(&pool, 4, 4096).as_slice());
}

#[test]
fn a_fatal_status_fails_the_requests_in_flight_and_resets() {
    let (model, bdev) = start(ModelConfig::default(), ControllerOptions::default());
    let mut ch = channel(&bdev);
    let pool = BufferPool::new(4096, 8).expect("pool");
    model.swallow(2, false);
    for tag in 0..2 {
        ch.submit(IoRequest::write(
            tag * 4096,
            smallvec![filled(&pool, 1, 4096)],
            tag,
        ))
        .expect("submitted");
    }
    model.set_fatal();
    let done = wait(&mut ch, 2);
    for c in &done {
        assert!(
            matches!(&c.result, Err(IoError::Aborted(m)) if m.contains("reset")),
            "{:?}",
            c.result
        );
        assert_eq!(c.bufs.len(), 1);
    }
    assert_eq!(model.enables(), 2);
    let c = run(
        &mut ch,
        IoRequest::write(0, smallvec![filled(&pool, 6, 4096)], 5),
    );
    assert_eq!(c.result, Ok(()));
    assert_eq!(model.disk(0, 4096), filled(&pool, 6, 4096).as_slice());
}

#[test]
fn channels_get_their_own_queue_ids_and_give_them_back() {
    let (_model, bdev) = start(ModelConfig::default(), ControllerOptions::default());
    let a = channel(&bdev);
    let b = channel(&bdev);
    assert_ne!(a.queue_id(), b.queue_id());
    let qa = a.queue_id();
    drop(a);
    let c = channel(&bdev);
    assert_eq!(c.queue_id(), qa);
}

#[test]
fn command_builders_put_fields_where_the_spec_says() {
    let c = Command::write(1, 0x1_2345_6789, 8, true).with_cid(0xbeef);
    assert_eq!(c.opcode(), spec::nvm::WRITE);
    assert_eq!(c.dw[0] >> 16, 0xbeef);
    assert_eq!(c.dw[1], 1);
    assert_eq!((c.dw[10], c.dw[11]), (0x2345_6789, 1));
    assert_eq!(c.dw[12], 7 | 1 << 30);
    let q = Command::create_io_cq(3, 256, 0x1000, Some(3));
    assert_eq!(q.dw[10], 255 << 16 | 3);
    assert_eq!(q.dw[11], 3 << 16 | 0b11);
    let s = Command::create_io_sq(3, 256, 0x2000, 3);
    assert_eq!(s.dw[11], 3 << 16 | 1);
    assert_eq!(Command::abort(2, 9).dw[10], 9 << 16 | 2);
    assert_eq!(Command::set_number_of_queues(4).dw[11], 3 << 16 | 3);
    let cap = Capabilities::parse(0x0020_0030_1f00_07ff);
    assert_eq!(cap.max_queue_entries, 2048);
    assert_eq!(cap.timeout_ms, 15_500);
    assert!(cap.nvm_command_set);
    assert_eq!(cap.sq_doorbell(1), 0x1008);
    assert_eq!(cap.cq_doorbell(1), 0x100c);
    let done = Completion {
        result: 5,
        sq_head: 7,
        sq_id: 1,
        cid: 42,
        phase: true,
        status: Status::LBA_OUT_OF_RANGE,
    };
    assert_eq!(Completion::parse(done.encode()), done);
    assert_eq!(done.status.errno(), libc::ERANGE);
}

#[test]
fn prp_and_sgl_construction() {
    let mut list = vec![0u64; 512];
    let mut w = |off: usize, v: u64| list[off / 8] = v;
    let seg = |iova, len| Segment { iova, len };
    assert_eq!(
        datapath::build(&[seg(0x10000, 4096)], false, 0xf000, &mut w),
        Ok(DataPointer::Prp(0x10000, 0))
    );
    assert_eq!(
        datapath::build(&[seg(0x10000, 8192)], false, 0xf000, &mut w),
        Ok(DataPointer::Prp(0x10000, 0x11000))
    );
    // Three segments, five pages: PRP1, then a list of four.
    let r = datapath::build(
        &[seg(0x10000, 8192), seg(0x40000, 4096), seg(0x80000, 8192)],
        false,
        0xf000,
        &mut w,
    );
    assert_eq!(r, Ok(DataPointer::Prp(0x10000, 0xf000)));
    assert_eq!(&list[..4], &[0x11000, 0x40000, 0x80000, 0x81000]);
    let mut w = |_: usize, _: u64| {};
    assert_eq!(
        datapath::build(&[seg(0x10000, 512), seg(0x20000, 512)], false, 0, &mut w),
        Err(DataError::NotPageShaped)
    );
    assert_eq!(
        datapath::build(&[seg(0x10002, 512)], true, 0, &mut w),
        Err(DataError::Unaligned)
    );
    let too_many = vec![seg(0x10000, 4096 * 600)];
    assert!(matches!(
        datapath::build(&too_many, false, 0, &mut w),
        Err(DataError::TooManyEntries(_))
    ));
    let mut sgl = [0u64; 8];
    let mut w = |off: usize, v: u64| sgl[off / 8] = v;
    let r = datapath::build(
        &[seg(0x10000, 512), seg(0x20000, 1024)],
        true,
        0xe000,
        &mut w,
    );
    assert_eq!(r, Ok(DataPointer::Sgl([0xe000, 0, 32, 0x30 << 24])));
    assert_eq!(&sgl[..4], &[0x10000, 512, 0x20000, 1024]);
    let bufs = [(0x1000, 8192), (0x9000, 4096)];
    assert_eq!(
        datapath::slice(&bufs, 4096, 8192).to_vec(),
        vec![seg(0x2000, 4096), seg(0x9000, 4096)]
    );
    assert_eq!(
        datapath::pieces(10, 4).collect::<Vec<_>>(),
        vec![(0, 4), (4, 4), (8, 2)]
    );
}
