//! The leader lease: whether this supervisor may publish, and when it must next acquire or renew
//! the lock. A pure state machine over `Instant`s; the Redis commands are in `publisher` and the
//! actor feeds their outcomes in here.
//!
//! Timing, for a lock TTL `T` (`[beat].lock_ttl`):
//! - the leader renews every `T/3`, so two renewals can fail before the lock expires;
//! - the leader counts its lease from the moment it *sent* the acquire/renew and stops publishing
//!   at `sent + T − T/5`, before Redis can expire the lock, leaving a fifth of the TTL for reply
//!   latency and clock-rate differences (fencing; the publish script checks the lock anyway);
//! - a follower retries when the holder's lock is due to expire (its PTTL) and at least every
//!   `T/3`, so after a leader dies another takes over within `T` of its last renewal.

use std::time::Duration;

use tokio::time::Instant;

use super::publisher::Holder;

/// Where this supervisor stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// `leader_lock = false`: always publish; only the slot check deduplicates.
    Disabled,
    /// Someone else holds the lock (or nobody could be asked yet).
    Follower {
        /// When to try to acquire again.
        retry_at: Instant,
        /// Who holds it, when known.
        holder: Option<String>,
    },
    /// We hold the lock.
    Leader {
        /// When to renew.
        renew_at: Instant,
        /// Publishing must stop at this instant unless renewed.
        valid_until: Instant,
    },
}

/// The lease and the token it is held with.
#[derive(Debug, Clone)]
pub struct Leader {
    token: String,
    name: String,
    ttl: Duration,
    lease: Lease,
}

impl Leader {
    /// A lease in its initial state: follower due to try now, or disabled.
    pub fn new(enabled: bool, ttl: Duration, token: String, now: Instant) -> Leader {
        let name = super::publisher::holder_name(&token);
        let lease = if enabled {
            Lease::Follower {
                retry_at: now,
                holder: None,
            }
        } else {
            Lease::Disabled
        };
        Leader {
            token,
            name,
            ttl,
            lease,
        }
    }

    /// The token to fence publishes with; `None` when the lock is off.
    pub fn fence(&self) -> Option<&str> {
        match self.lease {
            Lease::Disabled => None,
            _ => Some(&self.token),
        }
    }

    /// The secret token the lock is held with.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The current state.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The lock TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// True when publishing is allowed at `now`.
    pub fn may_publish(&self, now: Instant) -> bool {
        match self.lease {
            Lease::Disabled => true,
            Lease::Leader { valid_until, .. } => now < valid_until,
            Lease::Follower { .. } => false,
        }
    }

    /// True while we hold (or believe we hold) the lock, or the lock is off.
    pub fn is_leader(&self) -> bool {
        !matches!(self.lease, Lease::Follower { .. })
    }

    /// `host:pid` of the lock holder, when known.
    pub fn holder(&self) -> Option<String> {
        match &self.lease {
            Lease::Disabled => None,
            Lease::Leader { .. } => Some(self.name.clone()),
            Lease::Follower { holder, .. } => holder.clone(),
        }
    }

    /// When the actor must next talk to Redis about the lock: renew, retry, or the expiry that
    /// ends the lease.
    pub fn next_action(&self) -> Option<Instant> {
        match self.lease {
            Lease::Disabled => None,
            Lease::Follower { retry_at, .. } => Some(retry_at),
            Lease::Leader {
                renew_at,
                valid_until,
            } => Some(renew_at.min(valid_until)),
        }
    }

    /// True when an acquire or renew is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.next_action().is_some_and(|at| at <= now)
    }

    /// The lock was taken or renewed by a command sent at `sent_at`. Returns true when this
    /// makes us leader (we were not before).
    pub fn held(&mut self, sent_at: Instant) -> bool {
        let was_leader = matches!(self.lease, Lease::Leader { .. });
        self.lease = Lease::Leader {
            renew_at: sent_at + self.ttl / 3,
            valid_until: sent_at + self.ttl - self.ttl / 5,
        };
        !was_leader
    }

    /// Someone else holds the lock. Returns true when this ends our leadership.
    pub fn refused(&mut self, now: Instant, holder: Holder) -> bool {
        let was_leader = matches!(self.lease, Lease::Leader { .. });
        let wait = holder
            .ttl_ms
            .map(|ms| Duration::from_millis(ms) + Duration::from_millis(5))
            .unwrap_or(self.ttl / 3)
            .min(self.ttl / 3);
        self.lease = Lease::Follower {
            retry_at: now + wait,
            holder: holder.name,
        };
        was_leader
    }

    /// Redis could not be asked; try again at `retry_at`. A leader keeps its lease until it
    /// runs out (it cannot publish without Redis anyway). Returns true when leadership ended.
    pub fn unreachable(&mut self, now: Instant, retry_at: Instant) -> bool {
        match self.lease {
            Lease::Disabled => false,
            Lease::Leader { valid_until, .. } if now < valid_until => {
                self.lease = Lease::Leader {
                    renew_at: retry_at,
                    valid_until,
                };
                false
            }
            Lease::Leader { .. } => {
                self.lease = Lease::Follower {
                    retry_at,
                    holder: None,
                };
                true
            }
            Lease::Follower { ref holder, .. } => {
                self.lease = Lease::Follower {
                    retry_at,
                    holder: holder.clone(),
                };
                false
            }
        }
    }

    /// Ends a lease that ran out at `now`. Returns true when leadership ended.
    pub fn expire(&mut self, now: Instant) -> bool {
        match self.lease {
            Lease::Leader { valid_until, .. } if now >= valid_until => {
                self.lease = Lease::Follower {
                    retry_at: now,
                    holder: None,
                };
                true
            }
            _ => false,
        }
    }

    /// Leadership given up (shutdown or a publish refused by the fence).
    pub fn resign(&mut self, now: Instant) {
        if !matches!(self.lease, Lease::Disabled) {
            self.lease = Lease::Follower {
                retry_at: now,
                holder: None,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    fn leader() -> (Leader, Instant) {
        let now = Instant::now();
        (Leader::new(true, TTL, "host:1:secret".to_owned(), now), now)
    }

    #[test]
    fn follower_tries_at_once_then_leads() {
        let (mut lease, now) = leader();
        assert!(lease.due(now));
        assert!(!lease.may_publish(now));
        assert!(lease.held(now));
        assert!(lease.may_publish(now));
        assert_eq!(lease.next_action(), Some(now + TTL / 3));
        assert_eq!(lease.holder().as_deref(), Some("host:1"));
        // A renewal keeps leadership without a "new leader" edge.
        assert!(!lease.held(now + TTL / 3));
    }

    #[test]
    fn lease_stops_before_the_ttl() {
        let (mut lease, now) = leader();
        lease.held(now);
        let stop = now + TTL - TTL / 5;
        assert!(lease.may_publish(stop - Duration::from_millis(1)));
        assert!(!lease.may_publish(stop));
        assert!(!lease.expire(stop - Duration::from_millis(1)));
        assert!(lease.expire(stop));
        assert!(!lease.is_leader());
    }

    #[test]
    fn refused_follower_retries_at_the_holders_expiry() {
        let (mut lease, now) = leader();
        let ended = lease.refused(
            now,
            Holder {
                name: Some("other:2".to_owned()),
                ttl_ms: Some(400),
            },
        );
        assert!(!ended);
        assert_eq!(lease.next_action(), Some(now + Duration::from_millis(405)));
        assert_eq!(lease.holder().as_deref(), Some("other:2"));
        lease.refused(
            now,
            Holder {
                name: None,
                ttl_ms: Some(60_000),
            },
        );
        assert_eq!(lease.next_action(), Some(now + TTL / 3));
    }

    #[test]
    fn unreachable_leader_keeps_its_lease_until_it_runs_out() {
        let (mut lease, now) = leader();
        lease.held(now);
        let retry = now + Duration::from_millis(100);
        assert!(!lease.unreachable(now, retry));
        assert!(lease.may_publish(now));
        assert_eq!(lease.next_action(), Some(retry));
        let late = now + TTL;
        assert!(lease.unreachable(late, late + Duration::from_millis(100)));
        assert!(!lease.may_publish(late));
    }

    #[test]
    fn disabled_always_publishes_unfenced() {
        let now = Instant::now();
        let lease = Leader::new(false, TTL, "h:1:s".to_owned(), now);
        assert!(lease.may_publish(now));
        assert_eq!(lease.fence(), None);
        assert_eq!(lease.next_action(), None);
    }
}
