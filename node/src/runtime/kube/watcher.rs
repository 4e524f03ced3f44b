//! One task per kind and namespace in use: lists Shoal's objects (by the
//! managed-by label), then watches them from that list's resourceVersion,
//! and tells the reconciler what it sees. A watch the server ends (its
//! `timeoutSeconds`) is resumed from the last resourceVersion; an error
//! (410 Gone, a broken stream) lists again. Refusals and failures back off,
//! 1 s doubling to 30 s, and the backoff resets only after a watch stayed
//! open for 30 s, so a refused watch does not cost a list every second.

use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject, ListParams, WatchEvent, WatchParams};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{call, explain, objects, transient};

/// A watch: one kind in one namespace (or cluster-wide for a cluster-scoped kind).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct WatchKey {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
}

/// What a watch task saw.
pub(super) enum Seen {
    /// Every object of the kind, as of `resourceVersion` (the third field).
    Listed(WatchKey, Vec<Value>, String),
    /// Added or modified.
    Put(WatchKey, Value),
    /// Deleted, or no longer matching the label.
    Gone(WatchKey, Value),
    /// The API server could not be reached.
    Down(String),
}

/// A watch silent for longer than its server-side timeout (290 s) is dead.
const SILENCE: Duration = Duration::from_secs(300);
/// A watch open this long counts as healthy: the backoff starts over.
const HEALTHY: Duration = Duration::from_secs(30);

pub(super) async fn run(
    api: Api<DynamicObject>,
    wk: WatchKey,
    tx: mpsc::Sender<Seen>,
    limit: Duration,
) {
    let selector = objects::selector(None);
    let mut backoff = Duration::from_secs(1);
    let to_value = |o: &DynamicObject| serde_json::to_value(o).unwrap_or(Value::Null);
    let pause = |backoff: &mut Duration| {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(Duration::from_secs(30));
        tokio::time::sleep(wait)
    };
    let mut warned = false;
    loop {
        let list = match call(limit, api.list(&ListParams::default().labels(&selector))).await {
            Ok(l) => l,
            Err(e) => {
                if transient(&e) {
                    if tx.send(Seen::Down(explain(&e))).await.is_err() {
                        return;
                    }
                } else if !warned {
                    warned = true;
                    tracing::warn!(kind = %wk.kind, ns = ?wk.namespace, error = %explain(&e),
                        "cannot list Shoal's objects: drift is repaired only by the periodic re-apply");
                }
                pause(&mut backoff).await;
                continue;
            }
        };
        warned = false;
        let mut rv = list.metadata.resource_version.clone().unwrap_or_default();
        let items = list.items.iter().map(to_value).collect();
        if tx
            .send(Seen::Listed(wk.clone(), items, rv.clone()))
            .await
            .is_err()
        {
            return;
        }
        // Watch from `rv`; resume after a normal end, list again after an error.
        loop {
            let opened = tokio::time::Instant::now();
            let wp = WatchParams::default().labels(&selector).timeout(290);
            let stream = match call(limit, api.watch(&wp, &rv)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(kind = %wk.kind, error = %explain(&e), "watch refused");
                    break;
                }
            };
            let mut stream = std::pin::pin!(stream);
            let mut broken = false;
            loop {
                let ev = match tokio::time::timeout(SILENCE, stream.next()).await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                };
                let msg = match ev {
                    Ok(WatchEvent::Added(o)) | Ok(WatchEvent::Modified(o)) => {
                        rv = o.metadata.resource_version.clone().unwrap_or(rv);
                        Seen::Put(wk.clone(), to_value(&o))
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        rv = o.metadata.resource_version.clone().unwrap_or(rv);
                        Seen::Gone(wk.clone(), to_value(&o))
                    }
                    Ok(WatchEvent::Bookmark(b)) => {
                        rv = b.metadata.resource_version;
                        continue;
                    }
                    // 410 Gone and the like: list again.
                    Ok(WatchEvent::Error(_)) | Err(_) => {
                        broken = true;
                        break;
                    }
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
            if opened.elapsed() >= HEALTHY {
                backoff = Duration::from_secs(1);
            }
            if broken {
                break;
            }
            if opened.elapsed() < HEALTHY {
                pause(&mut backoff).await;
            }
        }
        pause(&mut backoff).await;
    }
}
