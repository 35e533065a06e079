//! The two per-request crypto costs of the hot path: opening a sealed provider key (AES-256-GCM)
//! and hashing a presented gateway key (SHA-256) for its lookup. Sealing is measured too: it is
//! what every provider-key write and `master-key rotate` pays.
//!
//! Run with `cargo bench --bench crypto`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::crypto::{KeyRing, generate_master_key, parse_master_key, sha256_hex};

/// A provider key of realistic length (OpenAI project keys are ~164 characters).
const PROVIDER_KEY: &str = "sk-proj-Abc123Def456Ghi789Jkl012Mno345Pqr678Stu901Vwx234Yz\
                            Abc123Def456Ghi789Jkl012Mno345Pqr678Stu901Vwx234YzAbc123Def456\
                            Ghi789Jkl012Mno345Pqr678Stu901Vwx";
/// A gateway key as tollgate issues them: `sk-tg-` and 48 base62 characters.
const GATEWAY_KEY: &str = "sk-tg-q3Vx9LmP2aRt7YbKc4NwZs8HdJf6Ge1Uo5Ii0XyTvBnMlQkW";
/// Associated data: the provider key row's id.
const ROW_ID: &str = "0193a1b2c3d47e8f9a0b1c2d3e4f5a6b";

fn keyring() -> KeyRing {
    let key = parse_master_key(&generate_master_key()).expect("generated key parses");
    KeyRing::new(&[key]).expect("one key is a valid ring")
}

fn provider_key(c: &mut Criterion) {
    let ring = keyring();
    let sealed = ring.seal(PROVIDER_KEY.as_bytes(), ROW_ID);
    assert_eq!(
        ring.open_string(&sealed, ROW_ID).expect("opens"),
        PROVIDER_KEY
    );

    let mut g = c.benchmark_group("provider_key");
    g.bench_function("seal", |b| {
        b.iter(|| ring.seal(black_box(PROVIDER_KEY.as_bytes()), black_box(ROW_ID)))
    });
    g.bench_function("open", |b| {
        b.iter(|| ring.open_string(black_box(&sealed), black_box(ROW_ID)))
    });
    g.finish();
}

fn gateway_key(c: &mut Criterion) {
    c.bench_function("gateway_key/sha256_hex", |b| {
        b.iter(|| sha256_hex(black_box(GATEWAY_KEY)))
    });
}

criterion_group!(benches, provider_key, gateway_key);
criterion_main!(benches);
