//! Metrics of OPC UA listeners: operations decided, by listener, service
//! and decision, and connections the front guard rejected, by kind. Label
//! values are listener names from the configuration, the service names of
//! rules and the guard's fixed anomaly kinds, so a client cannot add series.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OperationLabels {
    pub listener: Arc<str>,
    pub service: &'static str,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GuardLabels {
    pub listener: Arc<str>,
    pub kind: &'static str,
}

/// The OPC UA metric families.
// NOTE: each count looks its series up in the family, which takes the
// family's read lock, unlike the Modbus counters that `Instruments`
// resolves once per configuration.
#[derive(Debug, Default)]
pub struct OpcuaFamilies {
    operations: Family<OperationLabels, Counter>,
    guard_rejections: Family<GuardLabels, Counter>,
}

impl OpcuaFamilies {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "opcua_operations",
            "OPC UA operations decided, by listener, service and decision",
            self.operations.clone(),
        );
        registry.register(
            "opcua_guard_rejections",
            "OPC UA connections the front guard closed, by listener and anomaly kind",
            self.guard_rejections.clone(),
        );
    }

    /// Counts one decided operation; `service` is its name in rules.
    pub fn count_operation(&self, listener: &Arc<str>, service: &'static str, allowed: bool) {
        let labels = OperationLabels {
            listener: listener.clone(),
            service,
            decision: if allowed { "allow" } else { "deny" },
        };
        self.operations.get_or_create(&labels).inc();
    }

    /// Counts one connection the guard closed; `kind` is its anomaly kind.
    pub fn count_guard_rejection(&self, listener: &Arc<str>, kind: &'static str) {
        let labels = GuardLabels {
            listener: listener.clone(),
            kind,
        };
        self.guard_rejections.get_or_create(&labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::metrics::Metrics;

    #[test]
    fn opcua_operations_count_by_listener_service_and_decision() {
        let metrics = Metrics::new("test");
        let listener: Arc<str> = Arc::from("ua");
        metrics.opcua().count_operation(&listener, "read", true);
        metrics.opcua().count_operation(&listener, "read", true);
        metrics.opcua().count_operation(&listener, "write", false);
        let text = metrics.encode();
        assert!(text.contains(
            "sluice_opcua_operations_total{listener=\"ua\",service=\"read\",decision=\"allow\"} 2\n"
        ));
        assert!(text.contains(
            "sluice_opcua_operations_total{listener=\"ua\",service=\"write\",decision=\"deny\"} 1\n"
        ));
    }

    #[test]
    fn opcua_guard_rejections_count_by_kind() {
        let metrics = Metrics::new("test");
        let listener: Arc<str> = Arc::from("ua");
        metrics
            .opcua()
            .count_guard_rejection(&listener, "opcua_not_hello");
        let text = metrics.encode();
        assert!(text.contains(
            "sluice_opcua_guard_rejections_total{listener=\"ua\",kind=\"opcua_not_hello\"} 1\n"
        ));
    }
}
