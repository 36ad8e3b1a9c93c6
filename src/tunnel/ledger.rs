//! The server's per-user traffic ledger: byte budgets, traffic not yet added to the user table,
//! the limit cut, the drain before a limited user's sessions close, and the once-a-second sync
//! with the table. Pure policy: it takes `now` and gives the loop verdicts to carry out.
//!
//! One rule decides every budget: **budget = the table's budget − traffic this loop moved but
//! has not yet added to the table** ([`Ledger::allowance`]). Whatever makes the loop re-read the
//! table (an API change, a SIGHUP, the sync itself), the rule is applied the same way, so a user
//! can never be given back bytes it already moved.
//!
//! A counter reset happens in the table (API thread), while this loop keeps moving bytes without
//! the lock. The table counts its resets ([`UserTable::resets`]); when the ledger sees the count
//! change, the traffic it has not yet added happened before the reset and is dropped with it.
//! Only bytes moved between the reset and the loop's next look at the table (the next control
//! message or sync, normally well under a millisecond) can be taken for pre-reset traffic.

use std::collections::HashMap;
use std::ops::DerefMut;
use std::time::{Duration, Instant};

use super::pipe::Moved;
use crate::users::{Budget, UserId, UserTable};

/// How often counters are added to the user table.
pub const ACCOUNTING_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait, after a user reaches its limit, for already-charged bytes to be delivered before
/// its sessions are closed.
pub const LIMIT_DRAIN: Duration = Duration::from_secs(3);
/// How often draining users are checked (the check walks their sessions).
pub const DRAIN_CHECK: Duration = Duration::from_millis(50);

/// What the loop must do about a user's handshakes, streams and sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The limit no longer applies (raised, removed or counters reset): accept the user again.
    Readmit,
    /// The budget just ran out while moving bytes: refuse new handshakes and streams now; the
    /// sessions stay until what was charged is delivered ([`Ledger::finish_drains`]).
    Refuse,
    /// The table says the budget is spent: refuse the user and close its sessions now.
    Close,
}

/// Where a user stands with respect to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Admitted,
    /// Limit reached; sessions close once delivered or at `until`.
    Draining {
        until: Instant,
    },
    /// Limit reached; sessions closed (or being closed).
    Closed,
}

/// One user's account.
#[derive(Debug, Clone)]
struct UserLedger {
    /// The table's budget when last read (`None` = unlimited), before `pending_*`.
    table_budget: Option<u64>,
    /// The table's reset count when last read.
    resets: u32,
    /// Payload the user sent (stream → destination) not yet added to the table.
    pending_up: u64,
    /// Payload the user received (destination → stream) not yet added to the table.
    pending_down: u64,
    standing: Standing,
}

impl UserLedger {
    /// The one budget rule: the table's budget minus what is not in the table yet.
    fn effective_budget(&self) -> Option<u64> {
        self.table_budget
            .map(|b| b.saturating_sub(self.pending_up.saturating_add(self.pending_down)))
    }

    fn has_pending(&self) -> bool {
        self.pending_up != 0 || self.pending_down != 0
    }

    /// Reads the table's view of the user. A changed reset count means the traffic not yet in
    /// the table happened before that reset: it is dropped with the rest of the old counters.
    fn read_table(&mut self, budget: Budget, resets: u32) {
        if resets != self.resets {
            self.resets = resets;
            self.pending_up = 0;
            self.pending_down = 0;
        }
        self.table_budget = match budget {
            Budget::Unlimited => None,
            Budget::Remaining(n) => Some(n),
            Budget::Exhausted => Some(0),
        };
    }
}

/// Every user's account (see the module docs).
#[derive(Debug)]
pub struct Ledger {
    users: HashMap<UserId, UserLedger>,
    /// Users in [`Standing::Draining`] (so that idle loops skip the drain check).
    draining: usize,
    next_sync: Instant,
    next_drain_check: Instant,
}

impl Ledger {
    pub fn new(now: Instant) -> Ledger {
        Ledger {
            users: HashMap::new(),
            draining: 0,
            next_sync: now + ACCOUNTING_INTERVAL,
            next_drain_check: now,
        }
    }

    /// Takes the table's `budget` and reset count for `user` (new users are added). Returns what
    /// changed for the user's sessions: a user whose budget is spent is closed at once unless it
    /// is already limited (a drain in progress goes on); a limited user with budget is readmitted.
    pub fn apply_table(&mut self, user: UserId, budget: Budget, resets: u32) -> Option<Verdict> {
        let entry = self.users.entry(user).or_insert(UserLedger {
            table_budget: None,
            resets,
            pending_up: 0,
            pending_down: 0,
            standing: Standing::Admitted,
        });
        entry.read_table(budget, resets);
        self.judge(user)
    }

    /// Forgets a user (deleted): its unsynced traffic goes with it.
    pub fn remove(&mut self, user: UserId) {
        if let Some(e) = self.users.remove(&user) {
            if matches!(e.standing, Standing::Draining { .. }) {
                self.draining -= 1;
            }
        }
    }

    /// Whether `user` may open streams and handshakes now.
    pub fn admits(&self, user: UserId) -> bool {
        self.users
            .get(&user)
            .is_some_and(|e| e.standing == Standing::Admitted && e.effective_budget() != Some(0))
    }

    /// The bytes `user` may still move (`u64::MAX` when unlimited, 0 for unknown users).
    pub fn allowance(&self, user: UserId) -> u64 {
        self.users
            .get(&user)
            .map_or(0, |e| e.effective_budget().unwrap_or(u64::MAX))
    }

    /// Whether a datagram of `len` bytes fits in `user`'s budget (datagrams are never cut).
    pub fn allows(&self, user: UserId, len: usize) -> bool {
        self.allowance(user) >= len as u64
    }

    /// Records bytes moved for `user`. On the server, stream → destination is what the user sent
    /// (up) and destination → stream what it received (down). Returns [`Verdict::Refuse`] when
    /// this spent the last of the budget.
    pub fn charge(&mut self, now: Instant, user: UserId, moved: Moved) -> Option<Verdict> {
        if moved.to_socket == 0 && moved.to_stream == 0 {
            return None;
        }
        let entry = self.users.get_mut(&user)?;
        entry.pending_up = entry.pending_up.saturating_add(moved.to_socket);
        entry.pending_down = entry.pending_down.saturating_add(moved.to_stream);
        if entry.standing != Standing::Admitted || entry.effective_budget() != Some(0) {
            return None;
        }
        entry.standing = Standing::Draining {
            until: now + LIMIT_DRAIN,
        };
        self.draining += 1;
        self.next_drain_check = now;
        Some(Verdict::Refuse)
    }

    /// The draining users whose sessions must close now: those whose charged bytes were all
    /// `delivered`, and those whose [`LIMIT_DRAIN`] is over. Checks at most every
    /// [`DRAIN_CHECK`] (`delivered` walks sessions).
    pub fn finish_drains(
        &mut self,
        now: Instant,
        mut delivered: impl FnMut(UserId) -> bool,
    ) -> Vec<UserId> {
        let mut done = Vec::new();
        if self.draining == 0 || now < self.next_drain_check {
            return done;
        }
        let mut next = now + DRAIN_CHECK;
        for (&user, e) in self.users.iter_mut() {
            let Standing::Draining { until } = e.standing else {
                continue;
            };
            if now >= until || delivered(user) {
                e.standing = Standing::Closed;
                done.push(user);
            } else {
                next = next.min(until);
            }
        }
        self.draining -= done.len();
        self.next_drain_check = next;
        done
    }

    /// Whether the periodic sync with the table is due.
    pub fn sync_due(&self, now: Instant) -> bool {
        now >= self.next_sync
    }

    /// Adds the unsynced traffic to the table (locked through `lock`, only if there is any),
    /// re-reads the budgets of the users concerned, and re-arms the periodic sync. Returns the
    /// verdicts for users whose standing changed.
    pub fn sync<T: DerefMut<Target = UserTable>>(
        &mut self,
        now: Instant,
        now_unix: u64,
        lock: impl FnOnce() -> T,
    ) -> Vec<(UserId, Verdict)> {
        self.next_sync = now + ACCOUNTING_INTERVAL;
        let mut verdicts = Vec::new();
        if !self.users.values().any(UserLedger::has_pending) {
            return verdicts;
        }
        let mut synced = Vec::new();
        {
            let mut table = lock();
            for (&user, e) in self.users.iter_mut().filter(|(_, e)| e.has_pending()) {
                // Unknown to the table: deleted; the loop hears of it through its control channel.
                let Some(resets) = table.resets(user) else {
                    continue;
                };
                if resets == e.resets {
                    table.add_traffic(user, e.pending_up, e.pending_down);
                }
                table.touch(user, now_unix);
                e.pending_up = 0;
                e.pending_down = 0;
                e.read_table(table.budget(user), resets);
                synced.push(user);
            }
        }
        for user in synced {
            if let Some(v) = self.judge(user) {
                verdicts.push((user, v));
            }
        }
        verdicts
    }

    /// When the ledger next needs the loop: the periodic sync, or the next drain check.
    pub fn next_deadline(&self) -> Instant {
        if self.draining == 0 {
            self.next_sync
        } else {
            self.next_sync.min(self.next_drain_check)
        }
    }

    /// Moves `user` to the standing its budget calls for.
    fn judge(&mut self, user: UserId) -> Option<Verdict> {
        let e = self.users.get_mut(&user)?;
        let spent = e.effective_budget() == Some(0);
        let was_draining = matches!(e.standing, Standing::Draining { .. });
        let verdict = match (spent, e.standing) {
            (false, Standing::Admitted) | (true, Standing::Draining { .. } | Standing::Closed) => {
                return None;
            }
            (false, _) => {
                e.standing = Standing::Admitted;
                Verdict::Readmit
            }
            (true, Standing::Admitted) => {
                e.standing = Standing::Closed;
                Verdict::Close
            }
        };
        if was_draining {
            self.draining -= 1;
        }
        Some(verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ledger-test-key-0123456789";
    const MS: Duration = Duration::from_millis(1);

    fn down(n: u64) -> Moved {
        Moved {
            to_stream: n,
            to_socket: 0,
        }
    }

    fn up(n: u64) -> Moved {
        Moved {
            to_stream: 0,
            to_socket: n,
        }
    }

    /// A table with one API user limited to `limit`, and a ledger that has read it.
    fn setup(limit: Option<u64>) -> (Instant, UserTable, UserId, Ledger) {
        let t0 = Instant::now();
        let mut table = UserTable::new();
        let id = table.create(KEY.into(), None, limit, 0).unwrap();
        let mut ledger = Ledger::new(t0);
        let v = read(&mut ledger, &table, id);
        assert_eq!(v, None, "a new user with budget needs no verdict");
        (t0, table, id, ledger)
    }

    /// What the loop does on `UserAdded`/`UserChanged` (and at start).
    fn read(ledger: &mut Ledger, table: &UserTable, id: UserId) -> Option<Verdict> {
        ledger.apply_table(id, table.budget(id), table.resets(id).unwrap())
    }

    fn sync(ledger: &mut Ledger, now: Instant, table: &mut UserTable) -> Vec<(UserId, Verdict)> {
        ledger.sync(now, 7, || table)
    }

    fn counted(table: &UserTable, id: UserId) -> (u64, u64) {
        let u = table.get(id).unwrap();
        (u.bytes_up, u.bytes_down)
    }

    #[test]
    fn limit_cut_refuses_streams_and_handshakes_once_the_budget_is_spent() {
        let (t0, _, id, mut ledger) = setup(Some(1000));
        assert!(ledger.admits(id));
        assert_eq!(ledger.allowance(id), 1000);
        assert_eq!(ledger.charge(t0, id, down(600)), None);
        assert_eq!(
            ledger.allowance(id),
            400,
            "budget = table budget − unsynced"
        );
        assert!(ledger.admits(id));
        assert!(ledger.allows(id, 400) && !ledger.allows(id, 401));
        assert_eq!(ledger.charge(t0, id, up(400)), Some(Verdict::Refuse));
        assert!(
            !ledger.admits(id),
            "no new stream or handshake at the limit"
        );
        assert_eq!(ledger.allowance(id), 0, "pipes move nothing more");
        assert!(!ledger.allows(id, 1), "no datagram either");
        assert_eq!(
            ledger.charge(t0, id, down(0)),
            None,
            "nothing moved, nothing to say"
        );
    }

    #[test]
    fn unlimited_users_are_never_cut() {
        let (t0, mut table, id, mut ledger) = setup(None);
        assert_eq!(ledger.allowance(id), u64::MAX);
        assert_eq!(ledger.charge(t0, id, down(u64::MAX / 2)), None);
        assert_eq!(ledger.charge(t0, id, up(u64::MAX / 2)), None);
        assert_eq!(ledger.allowance(id), u64::MAX);
        assert!(ledger.admits(id) && ledger.allows(id, usize::MAX));
        assert_eq!(sync(&mut ledger, t0 + ACCOUNTING_INTERVAL, &mut table), []);
        assert_eq!(counted(&table, id), (u64::MAX / 2, u64::MAX / 2));
        assert!(ledger.admits(id));
    }

    #[test]
    fn drain_closes_the_sessions_once_the_paid_data_is_delivered() {
        let (t0, _, id, mut ledger) = setup(Some(1000));
        assert_eq!(ledger.charge(t0, id, down(1000)), Some(Verdict::Refuse));
        assert!(ledger.next_deadline() <= t0, "checked at once");
        assert_eq!(ledger.finish_drains(t0, |_| false), []);
        assert_eq!(ledger.next_deadline(), t0 + DRAIN_CHECK);
        assert_eq!(
            ledger.finish_drains(t0 + 10 * MS, |_| panic!("checked too often")),
            []
        );
        let mut asked = Vec::new();
        let done = ledger.finish_drains(t0 + DRAIN_CHECK, |u| {
            asked.push(u);
            true
        });
        assert_eq!((asked, done), (vec![id], vec![id]));
        assert_eq!(ledger.next_deadline(), t0 + ACCOUNTING_INTERVAL);
        assert_eq!(ledger.finish_drains(t0 + LIMIT_DRAIN, |_| true), []);
        assert!(!ledger.admits(id), "still refused after the close");
    }

    #[test]
    fn drain_closes_the_sessions_after_limit_drain_at_the_latest() {
        let (t0, mut table, id, mut ledger) = setup(Some(10));
        assert_eq!(ledger.charge(t0, id, down(10)), Some(Verdict::Refuse));
        let mut now = t0;
        while now < t0 + LIMIT_DRAIN {
            if ledger.sync_due(now) {
                assert_eq!(sync(&mut ledger, now, &mut table), []);
            }
            assert_eq!(ledger.finish_drains(now, |_| false), []);
            let next = ledger.next_deadline();
            assert!(next > now && next <= t0 + LIMIT_DRAIN, "armed, never late");
            now = next;
        }
        assert_eq!(now, t0 + LIMIT_DRAIN, "the deadline itself is a wake-up");
        assert_eq!(ledger.finish_drains(now, |_| false), [id]);
    }

    #[test]
    fn reset_lets_a_limited_user_back_in() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        assert_eq!(ledger.charge(t0, id, down(1000)), Some(Verdict::Refuse));
        let t1 = t0 + ACCOUNTING_INTERVAL;
        assert_eq!(sync(&mut ledger, t1, &mut table), [], "the drain goes on");
        assert_eq!(counted(&table, id), (0, 1000));
        assert_eq!(ledger.finish_drains(t1, |_| true), [id]);
        table.reset(KEY).unwrap();
        assert_eq!(read(&mut ledger, &table, id), Some(Verdict::Readmit));
        assert!(ledger.admits(id));
        assert_eq!(ledger.allowance(id), 1000);
    }

    #[test]
    fn traffic_not_yet_synced_at_a_reset_counts_before_it() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        ledger.charge(t0, id, down(300));
        table.reset(KEY).unwrap(); // the API thread
        assert_eq!(read(&mut ledger, &table, id), None);
        assert_eq!(ledger.allowance(id), 1000, "a fresh start after the reset");
        sync(&mut ledger, t0 + ACCOUNTING_INTERVAL, &mut table);
        assert_eq!(counted(&table, id), (0, 0));
    }

    #[test]
    fn a_sync_between_a_reset_and_its_message_drops_the_pre_reset_traffic() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        ledger.charge(t0, id, down(300));
        table.reset(KEY).unwrap();
        sync(&mut ledger, t0 + ACCOUNTING_INTERVAL, &mut table);
        assert_eq!(counted(&table, id), (0, 0));
        assert_eq!(ledger.allowance(id), 1000);
        // The UserChanged message arrives afterwards: nothing changes.
        assert_eq!(read(&mut ledger, &table, id), None);
        ledger.charge(t0, id, up(5));
        sync(&mut ledger, t0 + 2 * ACCOUNTING_INTERVAL, &mut table);
        assert_eq!(
            counted(&table, id),
            (5, 0),
            "traffic after the reset counts"
        );
    }

    #[test]
    fn rereading_the_table_with_unsynced_traffic_never_raises_the_budget() {
        // A SIGHUP (or any UserChanged) while part of the traffic is not in the table yet.
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        ledger.charge(t0, id, down(400));
        assert_eq!(read(&mut ledger, &table, id), None);
        assert_eq!(
            ledger.allowance(id),
            600,
            "the true remainder, not the table's 1000"
        );
        sync(&mut ledger, t0 + ACCOUNTING_INTERVAL, &mut table);
        assert_eq!(ledger.allowance(id), 600);
        ledger.charge(t0, id, up(100));
        assert_eq!(read(&mut ledger, &table, id), None);
        assert_eq!(ledger.allowance(id), 500);
    }

    #[test]
    fn rereading_the_table_during_a_drain_does_not_cut_the_drain_short() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        assert_eq!(ledger.charge(t0, id, down(1000)), Some(Verdict::Refuse));
        // The table does not know the bytes yet: its budget is 1000, the true remainder 0.
        assert_eq!(read(&mut ledger, &table, id), None);
        assert_eq!(ledger.allowance(id), 0);
        sync(&mut ledger, t0 + MS, &mut table);
        assert_eq!(table.budget(id), Budget::Exhausted);
        assert_eq!(read(&mut ledger, &table, id), None, "still draining");
        assert_eq!(ledger.finish_drains(t0 + DRAIN_CHECK, |_| true), [id]);
    }

    #[test]
    fn raising_the_limit_readmits_with_the_true_remainder() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        assert_eq!(ledger.charge(t0, id, down(1000)), Some(Verdict::Refuse));
        table.set_limit(KEY, Some(3000)).unwrap();
        assert_eq!(read(&mut ledger, &table, id), Some(Verdict::Readmit));
        assert_eq!(ledger.allowance(id), 2000);
        assert_eq!(
            ledger.next_deadline(),
            t0 + ACCOUNTING_INTERVAL,
            "no drain left"
        );
        table.set_limit(KEY, None).unwrap();
        assert_eq!(read(&mut ledger, &table, id), None);
        assert_eq!(ledger.allowance(id), u64::MAX);
    }

    #[test]
    fn a_limit_set_below_the_usage_closes_at_once() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        ledger.charge(t0, id, down(200));
        table.set_limit(KEY, Some(150)).unwrap();
        assert_eq!(read(&mut ledger, &table, id), Some(Verdict::Close));
        assert!(!ledger.admits(id));
        assert_eq!(read(&mut ledger, &table, id), None, "said once");
        // A new user whose budget is already spent is closed from the start.
        let other = table.create("ledger-test-key-other-0123".into(), None, Some(0), 0);
        let other = other.unwrap();
        assert_eq!(read(&mut ledger, &table, other), Some(Verdict::Close));
    }

    #[test]
    fn a_deleted_user_is_forgotten() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        assert_eq!(ledger.charge(t0, id, down(1000)), Some(Verdict::Refuse));
        table.delete(KEY).unwrap();
        ledger.remove(id);
        assert!(!ledger.admits(id));
        assert_eq!(ledger.allowance(id), 0);
        assert_eq!(ledger.charge(t0, id, down(5)), None);
        assert_eq!(
            ledger.next_deadline(),
            t0 + ACCOUNTING_INTERVAL,
            "no drain left"
        );
        assert_eq!(ledger.finish_drains(t0 + LIMIT_DRAIN, |_| true), []);
        assert_eq!(sync(&mut ledger, t0 + ACCOUNTING_INTERVAL, &mut table), []);
    }

    #[test]
    fn sync_runs_once_per_interval_and_locks_only_with_traffic() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        assert!(!ledger.sync_due(t0 + ACCOUNTING_INTERVAL - MS));
        assert!(ledger.sync_due(t0 + ACCOUNTING_INTERVAL));
        let t1 = t0 + ACCOUNTING_INTERVAL;
        let none: Vec<(UserId, Verdict)> = ledger.sync(t1, 7, || -> &mut UserTable {
            panic!("locked without traffic")
        });
        assert_eq!(none, []);
        assert!(!ledger.sync_due(t1) && ledger.sync_due(t1 + ACCOUNTING_INTERVAL));
        ledger.charge(t1, id, up(3));
        ledger.charge(t1, id, down(4));
        assert_eq!(sync(&mut ledger, t1, &mut table), []);
        assert_eq!(counted(&table, id), (3, 4));
        assert_eq!(table.get(id).unwrap().last_seen, Some(7));
        assert_eq!(ledger.allowance(id), 993);
        sync(&mut ledger, t1, &mut table);
        assert_eq!(counted(&table, id), (3, 4), "added once");
    }

    #[test]
    fn sync_reports_changes_the_table_made_meanwhile() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        ledger.charge(t0, id, down(100));
        table.set_limit(KEY, Some(50)).unwrap(); // its message is still on the way
        assert_eq!(
            sync(&mut ledger, t0, &mut table),
            [(id, Verdict::Close)],
            "the limit was lowered below the usage"
        );
        table.set_limit(KEY, Some(500)).unwrap();
        ledger.charge(t0, id, down(1));
        assert_eq!(sync(&mut ledger, t0, &mut table), [(id, Verdict::Readmit)]);
        assert_eq!(ledger.allowance(id), 399);
    }
}
