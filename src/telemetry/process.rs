//! The `process_*` metrics: prometheus' own process collector, except `process_cpu_seconds_total`,
//! which it rounds down to whole seconds (0 for a gateway that has used under a second, and a
//! counter that moves in steps of 1). Here CPU time is the exact tick count over the clock rate.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Opts};

const CPU: &str = "process_cpu_seconds_total";

/// [`prometheus::process_collector::ProcessCollector`] with a fractional CPU counter.
pub struct ProcessMetrics {
    inner: prometheus::process_collector::ProcessCollector,
    cpu: Counter,
    descs: Vec<Desc>,
}

impl ProcessMetrics {
    pub fn for_self() -> Self {
        let inner = prometheus::process_collector::ProcessCollector::for_self();
        let cpu = Counter::with_opts(Opts::new(
            CPU,
            "Total user and system CPU time spent in seconds.",
        ))
        .expect("a valid metric name");
        let descs = inner
            .desc()
            .into_iter()
            .filter(|d| d.fq_name != CPU)
            .chain(cpu.desc())
            .cloned()
            .collect();
        Self { inner, cpu, descs }
    }
}

/// This process's user + system CPU time in seconds, from `/proc/self/stat` (clock ticks over
/// `sysconf(_SC_CLK_TCK)`, read by procfs through rustix: no `unsafe` here).
pub fn cpu_seconds() -> Option<f64> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    let ticks = stat.utime.saturating_add(stat.stime);
    Some(ticks as f64 / procfs::ticks_per_second().max(1) as f64)
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut mfs: Vec<MetricFamily> = self
            .inner
            .collect()
            .into_iter()
            .filter(|mf| mf.name() != CPU)
            .collect();
        if let Some(now) = cpu_seconds() {
            // A counter only goes up; two scrapes at once may both add, never below the truth.
            let past = self.cpu.get();
            if now > past {
                self.cpu.inc_by(now - past);
            }
            mfs.extend(self.cpu.collect());
        }
        mfs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_are_fractional_and_the_other_process_metrics_stay() {
        // Burn CPU until the kernel has counted some ticks that are not a whole second.
        let mut x = 0u64;
        let cpu = loop {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
            let s = cpu_seconds().expect("/proc/self/stat");
            if s > 0.0 && s.fract() != 0.0 {
                break s;
            }
        };
        std::hint::black_box(x);
        let m = ProcessMetrics::for_self();
        let mfs = m.collect();
        let got = mfs
            .iter()
            .find(|mf| mf.name() == CPU)
            .expect("cpu family")
            .get_metric()[0]
            .get_counter()
            .get_value();
        assert!(got >= cpu && got.fract() != 0.0, "{got} vs {cpu}");
        assert_eq!(mfs.iter().filter(|mf| mf.name() == CPU).count(), 1);
        for name in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(mfs.iter().any(|mf| mf.name() == name), "{name}");
        }
        let r = prometheus::Registry::new();
        r.register(Box::new(ProcessMetrics::for_self()))
            .expect("registers");
        assert!(r.gather().iter().any(|mf| mf.name() == CPU));
    }
}
