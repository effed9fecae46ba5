//! The machine's limit for a RAM disk: one core copying random 4 KiB blocks out of 1 GiB, as
//! many per second as it can. A malloc bdev can at best approach this figure.

use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
#[command(about = "Random block memcpy rate of one core (the malloc bdev's ceiling)")]
struct Args {
    /// Size of the source area.
    #[arg(long, default_value = "1G", value_parser = engine::units::parse_size)]
    size: u64,
    /// Block size.
    #[arg(long, default_value = "4096", value_parser = engine::units::parse_size)]
    bs: u64,
    /// Seconds to run.
    #[arg(long, default_value_t = 5)]
    time: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    let bs = args.bs as usize;
    let blocks = (args.size / args.bs) as usize;
    let mut src = vec![0u8; blocks * bs];
    // Touch every page so the measurement does not include page faults.
    for (i, b) in src.iter_mut().enumerate().step_by(4096) {
        *b = i as u8;
    }
    let mut dst = vec![0u8; bs];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let deadline = Instant::now() + Duration::from_secs(args.time);
    let start = Instant::now();
    let mut ops = 0u64;
    while Instant::now() < deadline {
        for _ in 0..1024 {
            let blk = rng.gen_range(0..blocks);
            dst.copy_from_slice(&src[blk * bs..(blk + 1) * bs]);
            std::hint::black_box(&mut dst);
        }
        ops += 1024;
    }
    let rate = ops as f64 / start.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "copies_per_sec": rate, "bs": bs, "size": args.size })
        );
    } else {
        println!(
            "memcpy limit: {:.0} random {}-byte copies/s on one core",
            rate, bs
        );
    }
}
