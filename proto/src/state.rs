//! The states of tasks, attempts, rounds and campaigns, and a round's promotion decision: one
//! typed vocabulary for the controller (which converts at the store edge, where each state
//! column has a matching `CHECK` constraint) and the wire (which carries [`as_str`] names).
//!
//! [`as_str`]: TaskState::as_str

use std::fmt;

macro_rules! states {
    ($(#[doc = $doc:literal])* $name:ident { $($(#[doc = $vdoc:literal])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[doc = $vdoc])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        /// For reading a state column: a value outside the `CHECK` constraint is an error.
        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(&s).ok_or_else(|| format!("unknown {} {s:?}", stringify!($name)))
            }
        }
    };
}

states! {
    /// Where a task is: `blocked → queued → running → succeeded | failed | cancelled`.
    TaskState {
        /// Waiting for its dependencies.
        Blocked = "blocked",
        /// Claimable (after `next_run_at`).
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

states! {
    /// How one claim of a task ended.
    AttemptState {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        /// The worker stopped heartbeating.
        LeaseExpired = "lease_expired",
        Cancelled = "cancelled",
    }
}

states! {
    /// A round: `running → succeeded | failed | cancelled`.
    RoundStatus {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

states! {
    /// A campaign: `running ⇄ paused`, then `succeeded | failed | cancelled`; a failed one runs
    /// again through retry-stage, a finished one through extend.
    CampaignStatus {
        Running = "running",
        Paused = "paused",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

states! {
    /// A round's promotion decision.
    Decision {
        Promoted = "promoted",
        Rejected = "rejected",
    }
}

impl TaskState {
    /// Finished, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl CampaignStatus {
    /// Still going: its tasks may run (running) or wait to (paused).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }

    pub fn is_final(self) -> bool {
        !self.is_active()
    }
}

/// A steering action on a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    Pause,
    Resume,
    Cancel,
}

impl Steer {
    /// The status the action moves a campaign in `from` to, or why it cannot: the one place
    /// where pause, resume and cancel are allowed or refused.
    pub fn apply(self, from: CampaignStatus) -> Result<CampaignStatus, String> {
        use CampaignStatus::*;
        match (self, from) {
            (Steer::Pause, Running) => Ok(Paused),
            (Steer::Resume, Paused) => Ok(Running),
            // A failed campaign may be cancelled too, so that nothing can resume it.
            (Steer::Cancel, Running | Paused | Failed) => Ok(Cancelled),
            (Steer::Pause, from) => Err(format!(
                "campaign is {from}, only a running campaign can be paused"
            )),
            (Steer::Resume, from) => Err(format!(
                "campaign is {from}, only a paused campaign can be resumed"
            )),
            (Steer::Cancel, from) => Err(format!("campaign is already {from}")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Steer::Pause => "pause",
            Steer::Resume => "resume",
            Steer::Cancel => "cancel",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_transitions_are_checked() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(*s));
        }
        assert!(TaskState::try_from("sleeping".to_string()).is_err());
        use CampaignStatus::*;
        assert_eq!(Steer::Pause.apply(Running), Ok(Paused));
        assert_eq!(Steer::Resume.apply(Paused), Ok(Running));
        assert_eq!(Steer::Cancel.apply(Paused), Ok(Cancelled));
        assert!(Steer::Pause.apply(Paused).is_err());
        assert!(Steer::Resume.apply(Running).is_err());
        assert!(Steer::Cancel.apply(Succeeded).is_err());
        assert_eq!(Steer::Cancel.apply(Failed), Ok(Cancelled));
    }
}
