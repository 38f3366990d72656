//! Metrics of the read-only mirror: reads a mirror served or passed on, per
//! device, and the age of each block's data.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::FloatGauge;

/// Label values of `sluice_mirror_reads`, in the order of `MirrorRead`.
const READ_RESULTS: [&str; 3] = ["hit", "stale", "outside"];

/// The mirror's outcome for one read of FC 1 to 4 to a device with blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorRead {
    /// Served from memory.
    Hit,
    /// Inside a block whose data was stale.
    Stale,
    /// Not inside any one block.
    Outside,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    device: Arc<str>,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlockLabels {
    device: Arc<str>,
    /// Table and address range, such as `holding_register:0-199`.
    block: String,
}

/// The mirror's metric families. Clones share the same series.
#[derive(Clone, Debug, Default)]
pub struct MirrorFamilies {
    reads: Family<ReadLabels, Counter>,
    block_age: Family<BlockLabels, FloatGauge>,
}

impl MirrorFamilies {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "mirror_reads",
            "Reads to a device with mirror blocks, by result: hit (served from memory), stale, outside",
            self.reads.clone(),
        );
        registry.register_with_unit(
            "mirror_block_age",
            "Age of a mirror block's oldest data, set after each poll and every second",
            Unit::Seconds,
            self.block_age.clone(),
        );
    }

    /// Returns the read counters of `device`.
    pub fn reads(&self, device: &Arc<str>) -> MirrorReadCounters {
        MirrorReadCounters {
            counters: READ_RESULTS.map(|result| {
                self.reads.get_or_create_owned(&ReadLabels {
                    device: device.clone(),
                    result,
                })
            }),
        }
    }

    /// Returns the age gauge of one block. The series appears once set.
    pub fn block_age(&self, device: &Arc<str>, block: &str) -> MirrorBlockAge {
        MirrorBlockAge {
            family: self.block_age.clone(),
            labels: BlockLabels {
                device: device.clone(),
                block: block.to_owned(),
            },
        }
    }
}

/// Read counters of one device.
#[derive(Clone, Debug)]
pub struct MirrorReadCounters {
    counters: [Counter; READ_RESULTS.len()],
}

impl MirrorReadCounters {
    pub fn count(&self, read: MirrorRead) {
        self.counters[read as usize].inc();
    }
}

/// The age gauge of one block.
#[derive(Clone, Debug)]
pub struct MirrorBlockAge {
    family: Family<BlockLabels, FloatGauge>,
    labels: BlockLabels,
}

impl MirrorBlockAge {
    pub fn set(&self, age: Duration) {
        self.family
            .get_or_create(&self.labels)
            .set(age.as_secs_f64());
    }

    /// Removes the series, for a block that a reload removed.
    pub fn remove(&self) {
        self.family.remove(&self.labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn mirror_series_carry_device_and_block() {
        let metrics = Metrics::new("test");
        let device: Arc<str> = Arc::from("press-1");
        let reads = metrics.mirror().reads(&device);
        reads.count(MirrorRead::Hit);
        reads.count(MirrorRead::Hit);
        reads.count(MirrorRead::Outside);
        let age = metrics.mirror().block_age(&device, "coil:0-7");
        age.set(Duration::from_millis(250));

        let text = metrics.encode();
        for line in [
            "sluice_mirror_reads_total{device=\"press-1\",result=\"hit\"} 2\n",
            "sluice_mirror_reads_total{device=\"press-1\",result=\"stale\"} 0\n",
            "sluice_mirror_reads_total{device=\"press-1\",result=\"outside\"} 1\n",
            "sluice_mirror_block_age_seconds{device=\"press-1\",block=\"coil:0-7\"} 0.25\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }

        age.remove();
        assert!(!metrics.encode().contains("block=\"coil:0-7\""));
    }
}
