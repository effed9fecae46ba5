//! Channels sharing a thread's io_uring ring may together have more requests in flight than its
//! completion queue holds: each channel is limited by its own depth only, as when it had a ring
//! of its own, and every request completes (completions that overflow the queue wait in the
//! kernel until it has room).

use drivers::bdev::{Bdev, ChannelContext, IoBufs, IoChannel, IoRequest};
use drivers::uring::UringBdev;
use hugepages::BufferPool;

const BS: u64 = 4096;
const BLOCKS: u64 = 64;
const PER_CHANNEL: u64 = 3000;

#[test]
fn channels_may_have_more_in_flight_together_than_the_completion_queue_holds() {
    let dir = std::env::temp_dir().join(format!("qs-uring-overflow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("f.img");
    let bdev = UringBdev::open("u", &path, BS as u32, Some(BLOCKS * BS)).expect("open");
    let ctx = ChannelContext {
        queue_depth: 4096,
        ..ChannelContext::default()
    };
    let mut channels: Vec<Box<dyn IoChannel>> = (0..2)
        .map(|_| bdev.open_channel(&ctx).expect("ch"))
        .collect();
    let pool = BufferPool::new(BS as usize, 2 * PER_CHANNEL as usize).expect("pool");
    // Channel c writes byte c+1 to the even (c = 0) or odd (c = 1) blocks, over and over.
    for (c, ch) in channels.iter_mut().enumerate() {
        for i in 0..PER_CHANNEL {
            let block = (i * 2 + c as u64) % BLOCKS;
            let mut b = pool.get().expect("buffer");
            b.set_len(BS as usize).expect("len");
            b.as_mut_slice().fill(c as u8 + 1);
            let mut bufs = IoBufs::new();
            bufs.push(b);
            ch.submit(IoRequest::write(block * BS, bufs, i))
                .expect("refused below the channel's depth");
        }
    }
    let mut done = [0u64; 2];
    while channels.iter().any(|c| c.in_flight() > 0) {
        for (c, ch) in channels.iter_mut().enumerate() {
            let mut out = Vec::new();
            ch.poll(&mut out);
            for completion in out {
                completion.result.expect("write");
                done[c] += 1;
            }
        }
    }
    assert_eq!(done, [PER_CHANNEL, PER_CHANNEL]);
    drop(channels);
    drop(bdev);
    let data = std::fs::read(&path).expect("read");
    for block in 0..BLOCKS {
        let want = (block % 2) as u8 + 1;
        let got = &data[(block * BS) as usize..((block + 1) * BS) as usize];
        assert!(got.iter().all(|&b| b == want), "block {block}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
