//! Status written back onto objects: Gateway API conditions on Gateways,
//! and on WasmPlugins/TrafficExtensions whether they attach and whether their
//! module is fetched and loaded (and why not).

use serde_json::{Value, json};

use crate::objects::now_rfc3339;

/// A condition without its transition time (set when written).
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub kind: &'static str,
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

impl Condition {
    pub fn new(
        kind: &'static str,
        ok: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            status: if ok { "True" } else { "False" },
            reason: reason.into(),
            message: message.into(),
        }
    }

    pub fn unknown(
        kind: &'static str,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            status: "Unknown",
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Renders conditions, keeping `lastTransitionTime` from `old` for conditions whose status did not change.
pub fn conditions(new: &[Condition], old: Option<&Value>, generation: i64) -> Value {
    let old_conditions = old
        .and_then(|o| o.get("conditions"))
        .and_then(|c| c.as_array());
    let list: Vec<Value> = new
        .iter()
        .map(|c| {
            let previous = old_conditions.and_then(|cs| {
                cs.iter()
                    .find(|o| o.get("type").and_then(|t| t.as_str()) == Some(c.kind))
            });
            let time = match previous {
                Some(p) if p.get("status").and_then(|s| s.as_str()) == Some(c.status) => p
                    .get("lastTransitionTime")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(now_rfc3339),
                _ => now_rfc3339(),
            };
            json!({
                "type": c.kind,
                "status": c.status,
                "reason": c.reason,
                "message": c.message,
                "observedGeneration": generation,
                "lastTransitionTime": time,
            })
        })
        .collect();
    Value::Array(list)
}
