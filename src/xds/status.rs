//! Per-proxy, per-type sync bookkeeping shared by the SotW and delta state
//! machines, and the status istiod derives from it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::resources::ResourceType;

/// The sync state of one type for one proxy, as `istioctl proxy-status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncState {
    /// The last response was ACKed.
    Synced,
    /// A response is in flight and not yet ACKed.
    Stale,
    /// Nothing was ever sent for this type.
    #[serde(rename = "NOT SENT")]
    NotSent,
    /// The last response was rejected (NACK).
    Error,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Synced => "SYNCED",
            SyncState::Stale => "STALE",
            SyncState::NotSent => "NOT SENT",
            SyncState::Error => "ERROR",
        }
    }
}

/// How long a push waits, by default, for the reply to the previous response
/// of its type before it is sent anyway (a client that never replies still
/// gets config, and one that also stops reading meets the send timeout).
pub const REPLY_WAIT_LIMIT: Duration = Duration::from_secs(10);

/// A response that was sent: what, when, and which config change caused it.
#[derive(Debug, Clone)]
pub struct SentRecord {
    pub nonce: String,
    pub version: String,
    pub at: Instant,
    /// When the config change behind this response first happened (for change→ACK latency).
    pub change_at: Option<Instant>,
}

/// A rejection reported by the proxy.
#[derive(Debug, Clone)]
pub struct NackRecord {
    pub nonce: String,
    pub message: String,
    pub at: Instant,
}

/// The ACK/NACK ledger of one type on one stream (istiod's `WatchedResource`).
/// Its records are behind pointers, and an ACKed record is the sent one
/// shared: every stream has one ledger per type, and inline (two copies of
/// the nonce and version, a rejection's room) they had been a kilobyte and
/// a half of every stream.
#[derive(Debug, Clone, Default)]
pub struct TypeLedger {
    pub sent: Option<Arc<SentRecord>>,
    pub acked: Option<Arc<SentRecord>>,
    pub error: Option<Box<NackRecord>>,
}

/// What the request carrying a nonce turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// No nonce: a first request (or a reconnect).
    Initial,
    /// The nonce of our last response, no error: accepted.
    Ack { latency: Option<Duration> },
    /// The nonce of our last response with `error_detail`: rejected.
    Nack { message: String },
    /// A nonce that is not our last one: must be ignored.
    Stale,
}

impl TypeLedger {
    /// Classifies a reply by its nonce and error, updating the ledger.
    pub fn on_reply(&mut self, nonce: &str, error: Option<&str>, now: Instant) -> Reply {
        if nonce.is_empty() {
            return Reply::Initial;
        }
        let Some(sent) = self.sent.as_ref().filter(|s| s.nonce == nonce) else {
            return Reply::Stale;
        };
        match error {
            Some(message) => {
                self.error = Some(Box::new(NackRecord { nonce: nonce.to_string(), message: message.to_string(), at: now }));
                Reply::Nack { message: message.to_string() }
            }
            None => {
                let latency = sent.change_at.map(|c| now.saturating_duration_since(c));
                self.acked = Some(sent.clone());
                self.error = None;
                Reply::Ack { latency }
            }
        }
    }

    /// True while our last response has neither been ACKed nor NACKed, for at
    /// most `limit` (`REPLY_WAIT_LIMIT` by default). Pushes wait for the reply (one response per type
    /// in flight, as go-control-plane paces): a proxy that reads slower than
    /// config changes then gets them merged into one response, instead of a
    /// queue of responses that holds memory in the server and that the proxy
    /// must work through before it sees the latest config.
    pub fn awaiting_reply(&self, now: Instant, limit: Duration) -> bool {
        let Some(sent) = &self.sent else {
            return false;
        };
        let replied = self.acked.as_ref().is_some_and(|a| a.nonce == sent.nonce) || self.error.as_ref().is_some_and(|e| e.nonce == sent.nonce);
        !replied && now.saturating_duration_since(sent.at) < limit
    }

    pub fn record_sent(&mut self, nonce: String, version: String, now: Instant, change_at: Option<Instant>) {
        self.sent = Some(Arc::new(SentRecord { nonce, version, at: now, change_at }));
    }

    /// istiod's rule (`debugSyncStatus`): error, else not sent, else acked == sent.
    pub fn state(&self) -> SyncState {
        if self.error.is_some() {
            SyncState::Error
        } else if self.sent.is_none() {
            SyncState::NotSent
        } else if self.acked.as_ref().map(|a| &a.nonce) == self.sent.as_ref().map(|s| &s.nonce) {
            SyncState::Synced
        } else {
            SyncState::Stale
        }
    }

    pub fn view(&self, ty: ResourceType, resource_count: usize, now: Instant) -> TypeStatus {
        let age = |at: Instant| now.saturating_duration_since(at).as_secs_f64();
        TypeStatus {
            type_short: ty.short_name(),
            type_url: ty.type_url(),
            state: self.state(),
            sent_version: self.sent.as_ref().map(|s| s.version.clone()),
            sent_nonce: self.sent.as_ref().map(|s| s.nonce.clone()),
            acked_version: self.acked.as_ref().map(|s| s.version.clone()),
            acked_nonce: self.acked.as_ref().map(|s| s.nonce.clone()),
            sent_age_seconds: self.sent.as_ref().map(|s| age(s.at)),
            last_error: self.error.as_ref().map(|e| e.message.clone()),
            last_error_age_seconds: self.error.as_ref().map(|e| age(e.at)),
            resource_count,
        }
    }
}

/// A serialisable snapshot of one type's sync state (for `/debug/syncz` and CSDS).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TypeStatus {
    #[serde(rename = "type")]
    pub type_short: &'static str,
    pub type_url: &'static str,
    pub state: SyncState,
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    pub acked_version: Option<String>,
    pub acked_nonce: Option<String>,
    pub sent_age_seconds: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_age_seconds: Option<f64>,
    pub resource_count: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istiod_status_rules() {
        let now = Instant::now();
        let mut l = TypeLedger::default();
        assert_eq!(l.state(), SyncState::NotSent);
        l.record_sent("1".into(), "v1".into(), now, Some(now));
        assert_eq!(l.state(), SyncState::Stale);
        assert_eq!(l.on_reply("0", None, now), Reply::Stale);
        assert_eq!(l.state(), SyncState::Stale);
        assert!(matches!(l.on_reply("1", None, now), Reply::Ack { latency: Some(_) }));
        assert_eq!(l.state(), SyncState::Synced);
        l.record_sent("2".into(), "v2".into(), now, None);
        assert_eq!(l.on_reply("2", Some("bad listener"), now), Reply::Nack { message: "bad listener".into() });
        assert_eq!(l.state(), SyncState::Error);
        assert_eq!(l.acked.as_ref().unwrap().version, "v1", "the last good version is kept");
        l.record_sent("3".into(), "v3".into(), now, None);
        assert_eq!(l.state(), SyncState::Error, "error stays until an ACK");
        assert!(matches!(l.on_reply("3", None, now), Reply::Ack { latency: None }));
        assert_eq!(l.state(), SyncState::Synced);
    }

    #[test]
    fn a_ledger_is_three_pointers_and_an_ack_shares_the_sent_record() {
        // One ledger per type on every stream: its records are shared or boxed.
        assert_eq!(std::mem::size_of::<TypeLedger>(), 3 * std::mem::size_of::<usize>());
        let now = Instant::now();
        let mut l = TypeLedger::default();
        l.record_sent("1".into(), "v1".into(), now, None);
        l.on_reply("1", None, now);
        assert!(Arc::ptr_eq(l.sent.as_ref().unwrap(), l.acked.as_ref().unwrap()));
        assert_eq!(l.state(), SyncState::Synced);
    }

    #[test]
    fn awaiting_reply_until_ack_or_nack_or_the_limit() {
        let now = Instant::now();
        let mut l = TypeLedger::default();
        assert!(!l.awaiting_reply(now, REPLY_WAIT_LIMIT), "nothing sent");
        l.record_sent("1".into(), "v1".into(), now, None);
        assert!(l.awaiting_reply(now, REPLY_WAIT_LIMIT));
        assert_eq!(l.on_reply("0", None, now), Reply::Stale);
        assert!(l.awaiting_reply(now, REPLY_WAIT_LIMIT), "a stale nonce is not a reply");
        assert!(!l.awaiting_reply(now + REPLY_WAIT_LIMIT, REPLY_WAIT_LIMIT), "waits at most the limit");
        l.on_reply("1", None, now);
        assert!(!l.awaiting_reply(now, REPLY_WAIT_LIMIT), "ACKed");
        l.record_sent("2".into(), "v2".into(), now, None);
        assert!(l.awaiting_reply(now, REPLY_WAIT_LIMIT));
        l.on_reply("2", Some("bad"), now);
        assert!(!l.awaiting_reply(now, REPLY_WAIT_LIMIT), "NACKed");
    }
}
