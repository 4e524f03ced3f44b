//! Bytes per reading of the batch format for regular 1 Hz series, by how
//! the values move (`cargo run --release -p uplink --example batch_size`).
//!
//! One node, 100 series polled together once a second (their sequence
//! numbers interleave), 2,000 readings each, encoded in batches of 10
//! series (20,000 readings), signature included.
#![allow(clippy::unwrap_used, missing_docs)]

use uplink::batch::{Batch, Kind, Record, Series};

/// The next value's text, from the generator, the reading's index and the
/// last value.
type Pattern = fn(&mut u64, usize, f64) -> String;

/// xorshift64: deterministic, no dependency.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn main() {
    let patterns: [(&str, Pattern); 6] = [
        ("constant (a setpoint)", |_, _, _| "50".into()),
        ("meter, 0.1 V steps, drifting ±0.5 V", |x, _, prev| {
            let step = (next(x) % 11) as f64 - 5.0;
            format!("{:.1}", (prev * 10.0 + step).round() / 10.0)
        }),
        ("temperature, 0.01 steps, ±0.3 noise", |x, _, prev| {
            let step = (next(x) % 61) as f64 - 30.0;
            format!("{:.2}", (prev * 100.0 + step).round() / 100.0)
        }),
        (
            "float32 register, 0.1 V steps (230.1f32 = 230.10000610351562)",
            |x, _, prev| {
                let step = (next(x) % 11) as f32 - 5.0;
                let v = ((prev as f32) * 10.0 + step).round() / 10.0;
                f64::from(v).to_string()
            },
        ),
        ("counter (energy, Wh)", |x, i, _| {
            (1_000_000 + i as u64 * 3 + next(x) % 2).to_string()
        }),
        ("full-precision floats (worst case)", |x, _, _| {
            format!("{}", (next(x) % 1_000_000_007) as f64 / 7.123_456_789)
        }),
    ];
    for (name, make) in patterns {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let series: Vec<Series> = (0..100u64)
            .map(|s| {
                let mut prev = 230.0;
                let records = (0..2000usize)
                    .map(|i| {
                        let text = make(&mut x, i, prev);
                        prev = text.parse().unwrap_or(prev);
                        Record {
                            seq: s + 100 * i as u64,
                            at_ms: 1_764_000_000_000 + 1000 * i as u64,
                            value: text.into_bytes(),
                        }
                    })
                    .collect();
                Series {
                    name: format!("meter{s}/value"),
                    kind: Kind::Reading,
                    records,
                }
            })
            .collect();
        let (mut bytes, mut readings) = (0usize, 0usize);
        for (n, chunk) in series.chunks(10).enumerate() {
            let b = Batch {
                node: [1; 32],
                number: n as u64,
                series: chunk.to_vec(),
            };
            bytes += b.encode(|_| [0; 64]).unwrap().len();
            readings += b.records();
        }
        println!(
            "{name}: {:.2} bytes a reading ({bytes} bytes for {readings} readings)",
            bytes as f64 / readings as f64
        );
    }
}
