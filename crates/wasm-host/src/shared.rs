//! State that outlives one instance and is shared by every instance of the engine (one engine
//! per process): shared data, shared queues and plugin-defined metrics.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::status::Status;

#[derive(Default)]
pub(crate) struct SharedState {
    data: Mutex<SharedData>,
    queues: Mutex<SharedQueues>,
    metrics: Mutex<Metrics>,
}

/// Poisoning only means another thread panicked while holding the lock; the maps stay
/// consistent because every update is a single insert or remove.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// key → (value, cas).
type VmData = HashMap<Vec<u8>, (Vec<u8>, u32)>;

#[derive(Default)]
struct SharedData {
    /// vm_id → entries.
    by_vm: HashMap<String, VmData>,
    next_cas: u32,
}

#[derive(Default)]
struct SharedQueues {
    by_name: HashMap<(String, Vec<u8>), u32>,
    items: HashMap<u32, VecDeque<Vec<u8>>>,
    /// The instance whose root context registered the queue last (Envoy: the last registration
    /// wins); weak so a dropped instance stops being notified.
    owners: HashMap<u32, Weak<QueueSignal>>,
    next_id: u32,
}

/// Called (on the enqueuing thread) when a queue registered by the instance gets an item.
pub type QueueWaker = Arc<dyn Fn() + Send + Sync>;

/// An instance's inbox of `proxy_on_queue_ready` notifications: one entry per enqueue, in order,
/// drained on the instance's own thread.
#[derive(Default)]
pub struct QueueSignal {
    pending: Mutex<VecDeque<u32>>,
    waker: Mutex<Option<QueueWaker>>,
}

impl QueueSignal {
    fn notify(&self, id: u32) {
        lock(&self.pending).push_back(id);
        let waker = lock(&self.waker).clone();
        if let Some(w) = waker {
            w();
        }
    }

    pub(crate) fn set_waker(&self, waker: QueueWaker) {
        let has_pending = !lock(&self.pending).is_empty();
        *lock(&self.waker) = Some(waker.clone());
        // Items enqueued before the waker was installed must not be lost.
        if has_pending {
            waker();
        }
    }

    pub(crate) fn pop(&self) -> Option<u32> {
        lock(&self.pending).pop_front()
    }

    pub(crate) fn has_pending(&self) -> bool {
        !lock(&self.pending).is_empty()
    }
}

/// Kind of a plugin-defined metric (`proxy_define_metric` type 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// Current value of a plugin-defined metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricValue {
    Counter(u64),
    Gauge(i64),
    /// Histograms keep only a count and a sum of the recorded samples.
    Histogram {
        count: u64,
        sum: u64,
    },
}

/// One metric as returned by [`crate::WasmEngine::metrics_snapshot`]. Names are exactly what the
/// plugin defined (Envoy would prefix them with `wasmcustom.`; exporters choose their own prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSample {
    pub name: String,
    pub kind: MetricKind,
    pub value: MetricValue,
}

#[derive(Default)]
struct Metrics {
    by_name: HashMap<(String, MetricKind), u32>,
    /// Index = id - 1.
    values: Vec<MetricSample>,
}

impl SharedState {
    pub(crate) fn get_data(&self, vm_id: &str, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        lock(&self.data).by_vm.get(vm_id)?.get(key).cloned()
    }

    /// `cas == 0` writes unconditionally; otherwise the write happens only if the stored cas
    /// still equals it (a missing key has no cas, so any non-zero cas mismatches).
    pub(crate) fn set_data(
        &self,
        vm_id: &str,
        key: &[u8],
        value: Vec<u8>,
        cas: u32,
    ) -> Result<(), Status> {
        let mut data = lock(&self.data);
        data.next_cas = data.next_cas.wrapping_add(1).max(1);
        let next = data.next_cas;
        let map = data.by_vm.entry(vm_id.to_owned()).or_default();
        match map.get_mut(key) {
            Some(entry) => {
                if cas != 0 && entry.1 != cas {
                    return Err(Status::CasMismatch);
                }
                *entry = (value, next);
            }
            None => {
                if cas != 0 {
                    return Err(Status::CasMismatch);
                }
                map.insert(key.to_vec(), (value, next));
            }
        }
        Ok(())
    }

    pub(crate) fn register_queue(
        &self,
        vm_id: &str,
        name: &[u8],
        owner: Option<&Arc<QueueSignal>>,
    ) -> u32 {
        let mut q = lock(&self.queues);
        let id = match q.by_name.get(&(vm_id.to_owned(), name.to_vec())) {
            Some(id) => *id,
            None => {
                q.next_id += 1;
                let id = q.next_id;
                q.by_name.insert((vm_id.to_owned(), name.to_vec()), id);
                q.items.insert(id, VecDeque::new());
                id
            }
        };
        if let Some(owner) = owner {
            q.owners.insert(id, Arc::downgrade(owner));
        }
        id
    }

    pub(crate) fn resolve_queue(&self, vm_id: &str, name: &[u8]) -> Option<u32> {
        lock(&self.queues)
            .by_name
            .get(&(vm_id.to_owned(), name.to_vec()))
            .copied()
    }

    pub(crate) fn enqueue(&self, id: u32, value: Vec<u8>) -> Result<(), Status> {
        let owner = {
            let mut q = lock(&self.queues);
            let queue = q.items.get_mut(&id).ok_or(Status::NotFound)?;
            queue.push_back(value);
            q.owners.get(&id).and_then(Weak::upgrade)
        };
        // Outside the lock: the waker may wake another thread that dequeues at once.
        if let Some(owner) = owner {
            owner.notify(id);
        }
        Ok(())
    }

    pub(crate) fn dequeue(&self, id: u32) -> Result<Vec<u8>, Status> {
        let mut q = lock(&self.queues);
        let queue = q.items.get_mut(&id).ok_or(Status::NotFound)?;
        queue.pop_front().ok_or(Status::Empty)
    }

    pub(crate) fn define_metric(&self, kind: MetricKind, name: String) -> u32 {
        let mut m = lock(&self.metrics);
        if let Some(id) = m.by_name.get(&(name.clone(), kind)) {
            return *id;
        }
        let value = match kind {
            MetricKind::Counter => MetricValue::Counter(0),
            MetricKind::Gauge => MetricValue::Gauge(0),
            MetricKind::Histogram => MetricValue::Histogram { count: 0, sum: 0 },
        };
        m.values.push(MetricSample {
            name: name.clone(),
            kind,
            value,
        });
        let id = m.values.len() as u32;
        m.by_name.insert((name, kind), id);
        id
    }

    fn with_metric<R>(
        &self,
        id: u32,
        f: impl FnOnce(&mut MetricValue) -> Result<R, Status>,
    ) -> Result<R, Status> {
        let mut m = lock(&self.metrics);
        let index = (id as usize).checked_sub(1).ok_or(Status::NotFound)?;
        let sample = m.values.get_mut(index).ok_or(Status::NotFound)?;
        f(&mut sample.value)
    }

    pub(crate) fn increment_metric(&self, id: u32, offset: i64) -> Result<(), Status> {
        self.with_metric(id, |v| match v {
            MetricValue::Counter(c) if offset >= 0 => {
                *c = c.saturating_add(offset as u64);
                Ok(())
            }
            MetricValue::Gauge(g) => {
                *g = g.saturating_add(offset);
                Ok(())
            }
            _ => Err(Status::BadArgument),
        })
    }

    pub(crate) fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        self.with_metric(id, |v| {
            match v {
                MetricValue::Counter(c) => *c = value,
                MetricValue::Gauge(g) => *g = value as i64,
                MetricValue::Histogram { count, sum } => {
                    *count += 1;
                    *sum = sum.saturating_add(value);
                }
            }
            Ok(())
        })
    }

    pub(crate) fn get_metric(&self, id: u32) -> Result<u64, Status> {
        self.with_metric(id, |v| match v {
            MetricValue::Counter(c) => Ok(*c),
            MetricValue::Gauge(g) => Ok(*g as u64),
            MetricValue::Histogram { .. } => Err(Status::BadArgument),
        })
    }

    pub(crate) fn metrics_snapshot(&self) -> Vec<MetricSample> {
        let mut all = lock(&self.metrics).values.clone();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_cas() {
        let s = SharedState::default();
        assert!(s.get_data("vm", b"k").is_none());
        assert_eq!(
            s.set_data("vm", b"k", b"v1".to_vec(), 7),
            Err(Status::CasMismatch)
        );
        s.set_data("vm", b"k", b"v1".to_vec(), 0).unwrap();
        let (v, cas) = s.get_data("vm", b"k").unwrap();
        assert_eq!(v, b"v1");
        assert_ne!(cas, 0);
        s.set_data("vm", b"k", b"v2".to_vec(), cas).unwrap();
        assert_eq!(
            s.set_data("vm", b"k", b"v3".to_vec(), cas),
            Err(Status::CasMismatch)
        );
        assert_eq!(s.get_data("vm", b"k").unwrap().0, b"v2");
        assert!(s.get_data("other", b"k").is_none());
    }

    #[test]
    fn queues() {
        let s = SharedState::default();
        let id = s.register_queue("vm", b"q", None);
        assert_eq!(s.register_queue("vm", b"q", None), id);
        assert_eq!(s.resolve_queue("vm", b"q"), Some(id));
        assert_eq!(s.resolve_queue("vm2", b"q"), None);
        assert_eq!(s.dequeue(id), Err(Status::Empty));
        s.enqueue(id, b"a".to_vec()).unwrap();
        s.enqueue(id, b"b".to_vec()).unwrap();
        assert_eq!(s.dequeue(id).unwrap(), b"a");
        assert_eq!(s.dequeue(id).unwrap(), b"b");
        assert_eq!(s.enqueue(999, vec![]), Err(Status::NotFound));
    }

    #[test]
    fn queue_ready_goes_to_the_last_registration_while_it_lives() {
        let s = SharedState::default();
        let first = Arc::new(QueueSignal::default());
        let second = Arc::new(QueueSignal::default());
        let id = s.register_queue("vm", b"q", Some(&first));
        s.enqueue(id, b"1".to_vec()).unwrap();
        assert_eq!(first.pop(), Some(id));
        assert_eq!(s.register_queue("vm", b"q", Some(&second)), id);
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = woken.clone();
        second.set_waker(Arc::new(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        s.enqueue(id, b"2".to_vec()).unwrap();
        s.enqueue(id, b"3".to_vec()).unwrap();
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(!first.has_pending());
        assert_eq!(
            (second.pop(), second.pop(), second.pop()),
            (Some(id), Some(id), None)
        );
        drop(second);
        // The owner is gone: enqueue still works, nobody is notified.
        s.enqueue(id, b"4".to_vec()).unwrap();
        assert_eq!(s.dequeue(id).unwrap(), b"1");
    }

    #[test]
    fn metrics() {
        let s = SharedState::default();
        let c = s.define_metric(MetricKind::Counter, "c".into());
        let g = s.define_metric(MetricKind::Gauge, "g".into());
        let h = s.define_metric(MetricKind::Histogram, "h".into());
        assert_eq!(s.define_metric(MetricKind::Counter, "c".into()), c);
        s.increment_metric(c, 2).unwrap();
        assert_eq!(s.increment_metric(c, -1), Err(Status::BadArgument));
        s.increment_metric(g, -5).unwrap();
        s.record_metric(h, 10).unwrap();
        s.record_metric(h, 5).unwrap();
        assert_eq!(s.get_metric(c), Ok(2));
        assert_eq!(s.get_metric(g), Ok((-5i64) as u64));
        assert_eq!(s.get_metric(h), Err(Status::BadArgument));
        assert_eq!(s.get_metric(0), Err(Status::NotFound));
        let snap = s.metrics_snapshot();
        assert_eq!(snap[2].value, MetricValue::Histogram { count: 2, sum: 15 });
    }
}
