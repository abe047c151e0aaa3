//! Replay planning, pure: given what a channel still buffers and the id a subscriber resumes
//! from, which buffered messages it gets and whether it must be told about a gap.

use super::message::MessageId;

/// What a channel holds at the moment a subscriber joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The channel's epoch.
    pub epoch: u64,
    /// Sequence number of the oldest buffered message (`last + 1` when none is buffered).
    pub first: u64,
    /// Sequence number of the newest message ever published in this epoch (0 for none).
    pub last: u64,
}

/// Why a subscriber cannot resume exactly where it left off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// The messages after its id were dropped from the buffer (age, count or size).
    Expired,
    /// Its id is from another epoch: the channel was recreated, or the gateway restarted.
    Epoch,
    /// Its id is newer than anything this channel published.
    Unknown,
}

impl GapReason {
    /// The word used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Expired => "expired",
            GapReason::Epoch => "epoch",
            GapReason::Unknown => "unknown",
        }
    }
}

/// The outcome: deliver buffered messages with `seq >= from`, after telling about `gap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// First sequence number to deliver from the buffer.
    pub from: u64,
    /// Set when the subscriber must be told that messages are missing.
    pub gap: Option<GapReason>,
}

/// Plan a subscription. `None` means "new messages only".
pub fn plan(w: Window, resume: Option<MessageId>) -> Plan {
    debug_assert!(w.first <= w.last + 1, "window {w:?}");
    let Some(id) = resume else {
        return Plan {
            from: w.last + 1,
            gap: None,
        };
    };
    let gap = if id.epoch != w.epoch {
        Some(GapReason::Epoch)
    } else if id.seq > w.last {
        Some(GapReason::Unknown)
    } else if id.seq + 1 < w.first {
        Some(GapReason::Expired)
    } else {
        None
    };
    match gap {
        None => Plan {
            from: id.seq + 1,
            gap: None,
        },
        Some(g) => Plan {
            from: w.first,
            gap: Some(g),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(epoch: u64, seq: u64) -> Option<MessageId> {
        Some(MessageId { epoch, seq })
    }

    #[test]
    fn table() {
        // Buffer holds 11..=20 of epoch 5.
        let w = Window {
            epoch: 5,
            first: 11,
            last: 20,
        };
        let empty = Window {
            epoch: 5,
            first: 1,
            last: 0,
        };
        let drained = Window {
            epoch: 5,
            first: 21,
            last: 20,
        };
        let cases = [
            (w, None, 21, None),
            (w, id(5, 20), 21, None),
            (w, id(5, 15), 16, None),
            (w, id(5, 10), 11, None),
            (w, id(5, 9), 11, Some(GapReason::Expired)),
            (w, id(5, 0), 11, Some(GapReason::Expired)),
            (w, id(5, 21), 11, Some(GapReason::Unknown)),
            (w, id(4, 15), 11, Some(GapReason::Epoch)),
            (empty, id(5, 0), 1, None),
            (empty, None, 1, None),
            (empty, id(3, 9), 1, Some(GapReason::Epoch)),
            (drained, id(5, 20), 21, None),
            (drained, id(5, 19), 21, Some(GapReason::Expired)),
        ];
        for (w, resume, from, gap) in cases {
            assert_eq!(plan(w, resume), Plan { from, gap }, "{w:?} {resume:?}");
        }
    }
}
