//! The state every mesh object reports (ACCEPTED / INVALID / CONFLICT) and
//! the words for "the last accepted version keeps serving", shared by
//! TrafficPolicies and Sidecars.

use std::fmt;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyState {
    Accepted,
    Invalid,
    Conflict,
}

impl fmt::Display for PolicyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyState::Accepted => "ACCEPTED",
            PolicyState::Invalid => "INVALID",
            PolicyState::Conflict => "CONFLICT",
        })
    }
}

/// The message an INVALID object gets while its last accepted version serves.
pub fn last_accepted_keeps_serving(generation: Option<i64>) -> String {
    format!("the last accepted version{} keeps serving", generation.map(|g| format!(" (generation {g})")).unwrap_or_default())
}
