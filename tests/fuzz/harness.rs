//! The fuzz runner: a committed seed corpus, mutations of it, and a wall-clock bound.
//!
//! Each target first checks every file of `tests/fuzz/corpus/<target>/` as it is, then runs
//! proptest rounds until `TOLLGATE_FUZZ_SECS` (default 2) have passed or `TOLLGATE_FUZZ_CASES`
//! (default 1,000,000) cases ran. Each round has its own seed derived from the run's seed
//! (`TOLLGATE_FUZZ_SEED`, else the clock), printed with every failure so the run can be repeated.
//! A failure is shrunk by proptest and its seed saved in `tests/fuzz/regressions/<target>.txt`,
//! which later runs replay first (commit that file with the fix).

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngSeed, TestCaseError, TestError, TestRunner,
};

/// Cases per proptest round; the deadline is checked between rounds.
const ROUND_CASES: u32 = 64;

/// Bytes shown as an escaped string in failure reports (proptest prints inputs with `{:?}`).
#[derive(Clone, PartialEq, Eq)]
pub struct Input(pub Vec<u8>);

impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\" ({} bytes)", self.0.escape_ascii(), self.0.len())
    }
}

/// One named file of a target's seed corpus.
pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// The seed corpus of `target`, sorted by file name; a target without one is a failure.
pub fn corpus(target: &str) -> Vec<Seed> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut out: Vec<Seed> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            Seed {
                name: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(!out.is_empty(), "{} holds no seed", dir.display());
    out
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Runs `check` on every generated value of `strategy` until the time or case budget is spent.
/// Panics with the shrunk input, the reason and the seed when a case fails.
pub fn fuzz<S>(target: &'static str, strategy: S, check: impl Fn(&S::Value) -> Result<(), String>)
where
    S: Strategy,
{
    let secs: f64 = env_num("TOLLGATE_FUZZ_SECS", 2.0);
    let max_cases: u64 = env_num("TOLLGATE_FUZZ_CASES", 1_000_000);
    let seed: u64 = env_num(
        "TOLLGATE_FUZZ_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    // proptest persists through a `&'static str` path, relative to the package (cargo test's cwd).
    let persistence: &'static str =
        Box::leak(format!("tests/fuzz/regressions/{target}.txt").into_boxed_str());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs.max(0.0));
    let mut cases = 0u64;
    let mut round = 0u64;
    while cases < max_cases && (round == 0 || Instant::now() < deadline) {
        let config = Config {
            cases: ROUND_CASES,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(persistence))),
            rng_seed: RngSeed::Fixed(seed.wrapping_add(round.wrapping_mul(0x9e37_79b9_7f4a_7c15))),
            max_shrink_iters: 20_000,
            // Shrinking is bounded too, so a failure cannot hold CI past its budget.
            max_shrink_time: 30_000,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&strategy, |v| check(&v).map_err(TestCaseError::fail));
        match result {
            Ok(()) => {}
            Err(TestError::Fail(why, value)) => panic!(
                "fuzz target {target} failed: {why}\nminimal input: {value:#?}\n\
                 repeat with TOLLGATE_FUZZ_SEED={seed} (round {round}); the case's proptest seed \
                 was saved in {persistence}"
            ),
            Err(TestError::Abort(why)) => panic!("fuzz target {target} aborted: {why}"),
        }
        cases += u64::from(ROUND_CASES);
        round += 1;
    }
    eprintln!(
        "fuzz target {target}: {cases} generated cases in {:.1}s (TOLLGATE_FUZZ_SEED={seed})",
        started.elapsed().as_secs_f64()
    );
}

/// Checks every seed of the corpus as it is, naming the file on failure.
pub fn check_corpus(target: &str, seeds: &[Seed], check: impl Fn(&[u8]) -> Result<(), String>) {
    for s in seeds {
        if let Err(why) = check(&s.bytes) {
            panic!(
                "fuzz target {target}: corpus file {} fails: {why}\ninput: {:?}",
                s.name,
                Input(s.bytes.clone())
            );
        }
    }
}

/// One edit of a seed. Positions are proptest `Index`es, so they shrink towards the start and
/// stay valid whatever the length.
#[derive(Clone, Debug)]
pub enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    /// Inserts a token of the target's dictionary.
    InsertToken(Index, Index),
    InsertBytes(Index, Vec<u8>),
    Delete(Index, usize),
    /// Repeats a span right after itself.
    Duplicate(Index, usize),
    /// Copies a span of another seed in.
    Splice(Index, Index, Index, usize),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Mutation::InsertToken(i, t)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::InsertBytes(i, b)),
        2 => (any::<Index>(), 1usize..32).prop_map(|(i, n)| Mutation::Delete(i, n)),
        2 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        2 => (any::<Index>(), any::<Index>(), any::<Index>(), 1usize..64)
            .prop_map(|(s, f, t, n)| Mutation::Splice(s, f, t, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut b: Vec<u8>, m: &Mutation, seeds: &[Vec<u8>], dict: &[&[u8]]) -> Vec<u8> {
    let at = |i: &Index, len: usize| i.index(len + 1);
    match m {
        Mutation::FlipBit(i, bit) if !b.is_empty() => {
            let p = i.index(b.len());
            b[p] ^= 1 << bit;
        }
        Mutation::SetByte(i, v) if !b.is_empty() => {
            let p = i.index(b.len());
            b[p] = *v;
        }
        Mutation::InsertToken(i, t) if !dict.is_empty() => {
            let p = at(i, b.len());
            let tok = dict[t.index(dict.len())];
            b.splice(p..p, tok.iter().copied());
        }
        Mutation::InsertBytes(i, bytes) => {
            let p = at(i, b.len());
            b.splice(p..p, bytes.iter().copied());
        }
        Mutation::Delete(i, n) if !b.is_empty() => {
            let p = i.index(b.len());
            let end = (p + n).min(b.len());
            b.drain(p..end);
        }
        Mutation::Duplicate(i, n) if !b.is_empty() => {
            let p = i.index(b.len());
            let end = (p + n).min(b.len());
            let span = b[p..end].to_vec();
            b.splice(end..end, span);
        }
        Mutation::Splice(s, f, t, n) if !seeds.is_empty() => {
            let src = &seeds[s.index(seeds.len())];
            if !src.is_empty() {
                let from = f.index(src.len());
                let span = &src[from..(from + n).min(src.len())];
                let p = at(t, b.len());
                b.splice(p..p, span.iter().copied());
            }
        }
        Mutation::Truncate(i) => {
            let p = at(i, b.len());
            b.truncate(p);
        }
        _ => {}
    }
    b
}

/// Inputs grown from the corpus: a seed with up to `max_mutations` edits, a soup of dictionary
/// tokens, or random bytes.
pub fn inputs(
    seeds: &[Seed],
    dict: &'static [&'static [u8]],
    max_mutations: usize,
) -> BoxedStrategy<Input> {
    let seeds: std::sync::Arc<Vec<Vec<u8>>> =
        std::sync::Arc::new(seeds.iter().map(|s| s.bytes.clone()).collect());
    let n = seeds.len();
    let from_seed = {
        let seeds = seeds.clone();
        (0..n, prop::collection::vec(mutation(), 0..=max_mutations)).prop_map(move |(i, ms)| {
            let out = ms
                .iter()
                .fold(seeds[i].clone(), |b, m| apply(b, m, &seeds, dict));
            Input(out)
        })
    };
    let soup = prop::collection::vec(any::<Index>(), 0..24).prop_map(move |ts| {
        Input(
            ts.iter()
                .flat_map(|t| dict[t.index(dict.len())].iter().copied())
                .collect(),
        )
    });
    let random = prop::collection::vec(any::<u8>(), 0..256).prop_map(Input);
    prop_oneof![6 => from_seed, 2 => soup, 1 => random].boxed()
}
