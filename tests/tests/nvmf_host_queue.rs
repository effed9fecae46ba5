//! The NVMe/TCP initiator's I/O queues under a reactor: a parked reactor woken by the socket of
//! its channel, for completions and for output waiting for room; the channels of one thread
//! sharing one queue per controller, each with its own depth and its own completions.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drivers::nvmf::host::HostOptions;
use drivers::nvmf::pdu;
use drivers::{Bdev, IoBufs, IoChannel, IoRequest};
use engine::reactor::{IdlePolicy, PollStatus, Poller, ReactorContext, ReactorOptions, Reactors};
use hugepages::BufferPool;
use quicksplit_tests::nvmf::{export_ram_disk, filled_buffer, target};
use quicksplit_tests::{wait_for, RpcConn, TempDir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// A proxy on 127.0.0.1 in front of `port` for `conns` connections that holds back what the
/// target sends by `delay` (what the host sends goes straight through). Gives its port.
fn delaying_proxy(port: u16, conns: usize, delay: Duration) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for _ in 0..conns {
            let (host, _) = l.accept().expect("accept");
            let target = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let pipe = |mut from: TcpStream, mut to: TcpStream, delay: Duration| {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        std::thread::sleep(delay);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                })
            };
            pipe(
                host.try_clone().unwrap(),
                target.try_clone().unwrap(),
                Duration::ZERO,
            );
            pipe(target, host, delay);
        }
    });
    proxy
}

/// The descriptors an epoll set of this process watches: (fd, events, data), from /proc.
fn epoll_watches(epoll: i32) -> Vec<(i32, u32, u64)> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{epoll}")).expect("fdinfo");
    quicksplit_tests::epoll_fdinfo_watches(&info)
}

/// Reads block 0 through an NVMe/TCP channel on its reactor when asked; closes the channel
/// (ends) when the request channel closes.
struct WakeProbe {
    ch: Box<dyn IoChannel>,
    pool: BufferPool,
    asks: std::sync::mpsc::Receiver<()>,
    answers: std::sync::mpsc::Sender<(Instant, Result<(), drivers::IoError>)>,
    done: Vec<drivers::IoCompletion>,
}

impl Poller for WakeProbe {
    fn poll(&mut self, _cx: &mut ReactorContext) -> PollStatus {
        match self.asks.try_recv() {
            Ok(()) => {
                let mut bufs = IoBufs::new();
                bufs.push(self.pool.get().expect("buffer"));
                if self.ch.submit(IoRequest::read(0, bufs, 1)).is_err() {
                    panic!("read refused");
                }
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return PollStatus::Done,
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
        }
        if self.ch.poll(&mut self.done) == 0 {
            return PollStatus::Idle;
        }
        for d in self.done.drain(..) {
            let _ = self.answers.send((Instant::now(), d.result));
        }
        PollStatus::Busy
    }

    fn name(&self) -> &str {
        "wake_probe"
    }
}

/// An NVMe/TCP bdev's channel wakes its parked reactor: behind a proxy holding the controller's
/// replies back 30 ms, the reactor parks while a read waits, and the read completes well before
/// the reactor's longest park (100 ms) ends. The queue's socket is in the reactor's epoll set,
/// level-triggered with its number as the event data, while the channel is open, and out of it
/// once the channel closes. A spinning reactor, which never parks, hands out no epoll set.
#[test]
fn a_parked_reactor_wakes_for_its_nvmf_channel_completions() {
    let spinning = Reactors::start(&ReactorOptions {
        cores: vec![0],
        idle: IdlePolicy::Spin,
        inbox_size: 16,
    })
    .expect("reactors");
    let ctx = spinning
        .get(0)
        .call(|cx| cx.channel_context(4))
        .expect("call");
    assert!(ctx.fd_watch.is_none() && ctx.wake_fd.is_none());
    spinning.shutdown();

    let dir = TempDir::new("nvmf-wake");
    let (_server, _rpc, port, nqn) = target(dir.path());
    const DELAY: Duration = Duration::from_millis(30);
    // The admin queue and one I/O queue.
    let proxy = delaying_proxy(port, 2, DELAY);
    let opts = HostOptions::new("127.0.0.1", proxy, nqn);
    let bdev: Arc<dyn Bdev> = Arc::new(
        drivers::nvmf::attach("w", opts, Value::Null)
            .expect("attach")
            .remove(0),
    );
    let reactors = Reactors::start(&ReactorOptions {
        cores: vec![0],
        idle: IdlePolicy::Adaptive,
        inbox_size: 16,
    })
    .expect("reactors");
    let (ask, asks) = std::sync::mpsc::channel();
    let (answers, answered) = std::sync::mpsc::channel();
    let epoll = reactors
        .get(0)
        .call(move |cx| {
            let ctx = cx.channel_context(4);
            let ch = bdev.open_channel(&ctx).expect("open channel");
            cx.add_poller(Box::new(WakeProbe {
                ch,
                pool: BufferPool::new(4096, 1).expect("pool"),
                asks,
                answers,
                done: Vec::new(),
            }));
            ctx.fd_watch
                .expect("an adaptive reactor's epoll set")
                .as_fd()
                .as_raw_fd()
        })
        .expect("call");
    let watched = epoll_watches(epoll);
    let sockets: Vec<_> = watched.iter().filter(|w| w.2 != u64::MAX).collect();
    assert_eq!(sockets.len(), 1, "{watched:?}");
    let (fd, events, data) = *sockets[0];
    assert_eq!(data, fd as u64, "{watched:?}");
    // EPOLLIN | EPOLLRDHUP, level-triggered (the kernel adds EPOLLERR | EPOLLHUP).
    assert_eq!(events & !0x18, 0x2001, "{watched:?}");

    let mut took = Vec::new();
    for _ in 0..5 {
        // Long enough idle for the reactor to park.
        std::thread::sleep(Duration::from_millis(20));
        let start = Instant::now();
        ask.send(()).unwrap();
        reactors.get(0).wake_if_parked();
        let (at, result) = answered
            .recv_timeout(Duration::from_secs(10))
            .expect("the read completed");
        result.expect("read");
        took.push(at.duration_since(start));
    }
    took.sort();
    assert!(took[0] >= DELAY, "{took:?}");
    assert!(took[2] < Duration::from_millis(75), "{took:?}");

    // Closing the channel takes its socket out of the set.
    drop(ask);
    let end = Instant::now() + Duration::from_secs(5);
    while epoll_watches(epoll).iter().any(|w| w.2 != u64::MAX) {
        assert!(Instant::now() < end, "{:?}", epoll_watches(epoll));
        std::thread::sleep(Duration::from_millis(5));
    }
    reactors.shutdown();
}

/// `trsvcid` is a number or, as SPDK's rpc.py sends it, a string, wherever a method takes it:
/// `bdev_nvme_attach_controller`, the `nvmf` backup target, and `nvmf_export_start`'s `listen`
/// given as SPDK's listen address object. A string that is not a port is refused, naming it.
/// Connections of the export `nqn` (its admin and I/O queues), as the target counts them.
fn connections_of(rpc: &mut RpcConn, nqn: &str) -> u64 {
    rpc.ok("nvmf_get_exports", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["nqn"] == nqn)
        .map(|x| x["connections"].as_u64().unwrap())
        .sum()
}

/// Runs `reqs` (channel index, request) through `chans` and polls every channel until each has
/// its completion; gives each channel's completions in order.
fn run_on(
    chans: &mut [Box<dyn IoChannel>],
    reqs: Vec<(usize, IoRequest)>,
) -> Vec<Vec<drivers::IoCompletion>> {
    let n = reqs.len();
    for (i, r) in reqs {
        if chans[i].submit(r).is_err() {
            panic!("request refused on channel {i}");
        }
    }
    let mut got: Vec<Vec<drivers::IoCompletion>> = chans.iter().map(|_| Vec::new()).collect();
    let end = Instant::now() + Duration::from_secs(10);
    while got.iter().map(Vec::len).sum::<usize>() < n {
        for (ch, out) in chans.iter_mut().zip(got.iter_mut()) {
            ch.poll(out);
        }
        assert!(Instant::now() < end, "requests did not complete");
    }
    got
}

/// Every channel a thread opens on one controller shares one I/O queue (one TCP connection),
/// whatever the number of channels; another thread or another controller has its own; and
/// each channel gets back exactly its own requests, under the tags it gave them, with its own
/// data.
#[test]
fn channels_on_one_thread_share_the_controllers_io_queue() {
    let dir = TempDir::new("nvmf-shared-queue");
    let (_server, mut rpc, port, nqn) = target(dir.path());
    let ro_nqn = "nqn.2026-11.io.quicksplit:ro";
    let bdev = drivers::nvmf::attach("a", HostOptions::new("127.0.0.1", port, nqn), Value::Null)
        .expect("attach")
        .remove(0);
    let ro = drivers::nvmf::attach(
        "r",
        HostOptions::new("127.0.0.1", port, ro_nqn),
        Value::Null,
    )
    .expect("attach")
    .remove(0);
    // The admin queues only.
    assert!(wait_for(Duration::from_secs(5), || connections_of(
        &mut rpc, nqn
    ) == 1));
    let ctx = drivers::ChannelContext {
        queue_depth: 32,
        ..Default::default()
    };
    let mut chans: Vec<Box<dyn IoChannel>> = (0..3)
        .map(|_| bdev.open_channel(&ctx).expect("open channel"))
        .collect();
    let mut ro_ch = vec![ro.open_channel(&ctx).expect("open channel")];
    assert!(wait_for(Duration::from_secs(5), || {
        connections_of(&mut rpc, nqn) == 2 && connections_of(&mut rpc, ro_nqn) == 2
    }));

    let pool = BufferPool::new(64 << 10, 16).expect("pool");
    let filled = |fill: u8| filled_buffer(&pool, fill);
    // The same tag on every channel: a completion that went to another channel shows.
    let writes = (0..3)
        .map(|i| {
            (
                i,
                IoRequest::write(i as u64 * (64 << 10), filled(0x10 + i as u8), 7),
            )
        })
        .collect();
    let got = run_on(&mut chans, writes);
    for (i, done) in got.iter().enumerate() {
        assert_eq!(done.len(), 1, "channel {i}");
        assert_eq!(done[0].tag, 7);
        assert!(done[0].result.is_ok(), "channel {i}: {:?}", done[0].result);
        assert!(done[0].bufs[0]
            .as_slice()
            .iter()
            .all(|&b| b == 0x10 + i as u8));
        assert_eq!(chans[i].in_flight(), 0);
    }
    // Each block read back through the next channel, tagged by the block it reads.
    let reads = (0..3)
        .map(|i| {
            (
                (i + 1) % 3,
                IoRequest::read(i as u64 * (64 << 10), filled(0), i as u64),
            )
        })
        .collect();
    let got = run_on(&mut chans, reads);
    for (c, done) in got.iter().enumerate() {
        assert_eq!(done.len(), 1, "channel {c}");
        let block = done[0].tag as usize;
        assert_eq!((block + 1) % 3, c, "channel {c} got block {block}'s read");
        assert!(done[0].result.is_ok());
        assert!(done[0].bufs[0]
            .as_slice()
            .iter()
            .all(|&b| b == 0x10 + block as u8));
    }
    // Each channel takes requests up to its own depth even when others fill the shared queue
    // (128 entries): a full queue keeps them waiting, in order, not refused.
    let deep = drivers::ChannelContext {
        queue_depth: 128,
        ..Default::default()
    };
    let mut deep_chans: Vec<Box<dyn IoChannel>> = (0..2)
        .map(|_| bdev.open_channel(&deep).expect("open channel"))
        .collect();
    let small = BufferPool::new(4096, 256).expect("pool");
    let block = |fill: u8| filled_buffer(&small, fill);
    let reads: Vec<(usize, IoRequest)> = (0..128u64)
        .map(|i| (0, IoRequest::read((i % 16) * 4096, block(0xee), i)))
        .chain((0..16u64).map(|i| (1, IoRequest::read(i * 4096 + (64 << 10), block(0xee), i))))
        .collect();
    let got = run_on(&mut deep_chans, reads);
    assert_eq!(got[0].len(), 128);
    assert_eq!(got[1].len(), 16);
    for (c, done) in got.iter().enumerate() {
        let mut tags: Vec<u64> = done.iter().map(|d| d.tag).collect();
        tags.sort_unstable();
        assert_eq!(
            tags,
            (0..done.len() as u64).collect::<Vec<_>>(),
            "channel {c}"
        );
        for d in done {
            assert!(d.result.is_ok(), "{:?}", d.result);
            // Channel 0 read blocks of the first 64 KiB (0x10...), channel 1 of the next (0x11).
            assert!(d.bufs[0].as_slice().iter().all(|&b| b == 0x10 + c as u8));
        }
    }
    drop(deep_chans);
    // The other controller's namespace, through its own queue.
    let got = run_on(&mut ro_ch, vec![(0, IoRequest::read(0, filled(1), 1))]);
    assert!(got[0][0].result.is_ok(), "{:?}", got[0][0].result);
    assert!(got[0][0].bufs[0].as_slice().iter().all(|&b| b == 0));

    // Another thread's channel is another queue, closed with it.
    let bdev = Arc::new(bdev);
    let b = Arc::clone(&bdev);
    let ctx2 = ctx.clone();
    let (opened, wait_open) = std::sync::mpsc::channel();
    let (close, wait_close) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        let ch = b.open_channel(&ctx2).expect("open channel");
        opened.send(()).unwrap();
        let _ = wait_close.recv();
        drop(ch);
    });
    wait_open.recv().unwrap();
    assert!(wait_for(Duration::from_secs(5), || connections_of(
        &mut rpc, nqn
    ) == 3));
    close.send(()).unwrap();
    t.join().unwrap();
    assert!(wait_for(Duration::from_secs(5), || connections_of(
        &mut rpc, nqn
    ) == 2));
    // The queue lives while a channel does.
    chans.truncate(1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(connections_of(&mut rpc, nqn), 2);
    chans.clear();
    assert!(wait_for(Duration::from_secs(5), || connections_of(
        &mut rpc, nqn
    ) == 1));
}

/// A proxy on 127.0.0.1 in front of `port` for `conns` connections that holds the first
/// H2CData PDU a host sends (and so everything after it on that connection) until `release` is
/// set; what the target sends goes straight through. Gives its port.
fn data_holding_proxy(port: u16, conns: usize, release: Arc<AtomicBool>) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for _ in 0..conns {
            let (mut host, _) = l.accept().expect("accept");
            let mut target = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let (mut from_target, mut to_host) =
                (target.try_clone().unwrap(), host.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_target, &mut to_host);
                let _ = to_host.shutdown(std::net::Shutdown::Write);
            });
            let release = Arc::clone(&release);
            std::thread::spawn(move || {
                let mut pdu = Vec::new();
                loop {
                    let mut ch = [0u8; 8];
                    if host.read_exact(&mut ch).is_err() {
                        break;
                    }
                    while ch[0] == pdu::pdu_type::H2C_DATA && !release.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let plen = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]) as usize;
                    pdu.resize(plen.max(8), 0);
                    pdu[..8].copy_from_slice(&ch);
                    if host.read_exact(&mut pdu[8..]).is_err() || target.write_all(&pdu).is_err() {
                        break;
                    }
                }
                let _ = target.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    proxy
}

/// PDUs waiting for room in the socket have the queue's socket watched for output, so a
/// reactor parked on the epoll set wakes as soon as the controller has read; once everything
/// is out the watch goes back to input only. A proxy holds the host's data (H2CData) while
/// 32 MiB of writes are submitted and granted, so the socket cannot take it all; then the
/// channel is driven only when the epoll set reports an event, as a parked reactor would be:
/// without the output watch nothing would wake it (the controller answers nothing for a
/// command before it has its data).
#[test]
fn pdus_waiting_for_room_have_the_queue_socket_watched_for_output() {
    const EPOLLOUT: u32 = 0x4;
    const BLOCK: u64 = 128 << 10;
    let dir = TempDir::new("nvmf-output-watch");
    let (_server, mut rpc, port, _) = target(dir.path());
    let nqn = "nqn.2026-11.io.quicksplit:big";
    export_ram_disk(&mut rpc, port, nqn, "big", 32 * MIB);
    let release = Arc::new(AtomicBool::new(false));
    let proxy = data_holding_proxy(port, 2, Arc::clone(&release));
    let bdev = drivers::nvmf::attach("a", HostOptions::new("127.0.0.1", proxy, nqn), Value::Null)
        .expect("attach")
        .remove(0);
    let watch = drivers::FdWatch::new().expect("epoll");
    let epoll = watch.as_fd().as_raw_fd();
    let ctx = drivers::ChannelContext {
        queue_depth: 256,
        fd_watch: Some(watch.clone()),
        ..Default::default()
    };
    let mut ch = bdev.open_channel(&ctx).expect("open channel");
    let watched = epoll_watches(epoll);
    assert_eq!(watched.len(), 1, "the queue's socket: {watched:?}");
    assert_eq!(watched[0].1 & EPOLLOUT, 0, "{watched:?}");

    let writes = 32 * MIB / BLOCK;
    let pool = BufferPool::new(BLOCK as usize, writes as usize).expect("pool");
    for i in 0..writes {
        let req = IoRequest::write(i * BLOCK, filled_buffer(&pool, (i % 251) as u8 + 1), i);
        assert!(ch.submit(req).is_ok(), "write {i} refused");
    }
    let mut done = Vec::new();
    let grants = Instant::now() + Duration::from_secs(10);
    while epoll_watches(epoll)[0].1 & EPOLLOUT == 0 {
        ch.poll(&mut done);
        assert!(
            Instant::now() < grants,
            "output held back but the socket is never watched for it"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        done.is_empty(),
        "{} writes done with their data held",
        done.len()
    );
    release.store(true, Ordering::SeqCst);

    let five_s = rustix::event::Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    while (done.len() as u64) < writes {
        let mut events = Vec::with_capacity(4);
        rustix::event::epoll::wait(
            watch.as_fd(),
            rustix::buffer::spare_capacity(&mut events),
            Some(&five_s),
        )
        .expect("epoll_wait");
        assert!(
            !events.is_empty(),
            "parked for 5 s with {} of {writes} writes done: nothing woke the reactor",
            done.len()
        );
        ch.poll(&mut done);
    }
    for d in &done {
        assert!(d.result.is_ok(), "write {}: {:?}", d.tag, d.result);
    }
    let watched = epoll_watches(epoll);
    assert_eq!(
        watched[0].1 & EPOLLOUT,
        0,
        "still watched for output: {watched:?}"
    );

    drop(done);

    // Every block holds its write.
    let mut reads = vec![ch];
    let got = run_on(
        &mut reads,
        (0..writes)
            .step_by(7)
            .map(|i| (0, IoRequest::read(i * BLOCK, filled_buffer(&pool, 0), i)))
            .collect(),
    );
    for d in &got[0] {
        let want = (d.tag % 251) as u8 + 1;
        assert!(
            d.bufs[0].as_slice().iter().all(|&b| b == want),
            "block {}",
            d.tag
        );
    }
}
