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
//!
//! Access comes before budget: a disabled user, or one past its `expire_at`, is [blocked]
//! (handshakes refused with that reason, sessions closed at once) whatever its budget. The
//! ledger keeps every user's expiry instant and reports the next one in
//! [`Ledger::next_deadline`], so the loop acts on it without any API call.
//!
//! [blocked]: Block

use std::collections::BTreeSet;
use std::ops::DerefMut;
use std::time::{Duration, Instant};

use super::pipe::Moved;
use crate::proto::RefuseReason;
use crate::proto::id_map::IdMap;
use crate::proto::transport::CloseReason;
use crate::users::{Budget, User, UserId, UserTable};

/// How often counters are added to the user table.
pub const ACCOUNTING_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait, after a user reaches its limit, for already-charged bytes to be delivered before
/// its sessions are closed.
pub const LIMIT_DRAIN: Duration = Duration::from_secs(3);
/// How often draining users are checked (the check walks their sessions).
pub const DRAIN_CHECK: Duration = Duration::from_millis(50);
/// Longest sleep before an expiry far away is looked at again (wall-clock changes).
const EXPIRY_RECHECK: Duration = Duration::from_secs(60);

/// Why a user may not use the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Its traffic limit is reached.
    Quota,
    /// Its `expire_at` has passed.
    Expired,
    /// It was disabled.
    Disabled,
}

impl Block {
    /// The reason its handshakes are refused with.
    pub fn refuse_reason(self) -> RefuseReason {
        match self {
            Block::Quota => RefuseReason::QuotaExceeded,
            Block::Expired => RefuseReason::Expired,
            Block::Disabled => RefuseReason::Disabled,
        }
    }

    /// The reason its sessions are closed with.
    pub fn close_reason(self) -> CloseReason {
        match self {
            Block::Quota | Block::Expired => CloseReason::LimitReached,
            Block::Disabled => CloseReason::UserDeleted,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Block::Quota => "traffic limit reached",
            Block::Expired => "access expired",
            Block::Disabled => "disabled",
        }
    }
}

/// What the ledger reads from the table about one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableView {
    pub budget: Budget,
    /// [`User::resets`].
    pub resets: u32,
    pub enabled: bool,
    /// Unix seconds.
    pub expire_at: Option<u64>,
}

impl TableView {
    pub fn of(u: &User) -> TableView {
        TableView {
            budget: u.budget(),
            resets: u.resets,
            enabled: u.settings.enabled,
            expire_at: u.settings.expire_at,
        }
    }
}

/// What the loop must do about a user's handshakes, streams and sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The limit no longer applies (raised, removed or counters reset): accept the user again.
    Readmit,
    /// The budget just ran out while moving bytes: refuse new handshakes and streams now; the
    /// sessions stay until what was charged is delivered ([`Ledger::finish_drains`]).
    Refuse,
    /// Refuse the user and close its sessions now: the table says the budget is spent, or
    /// the user is disabled or expired.
    Close(Block),
}

/// Where a user stands with respect to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Admitted,
    /// Limit reached; sessions close once delivered or at `until`.
    Draining {
        until: Instant,
    },
    /// Limit reached, expired or disabled; sessions closed (or being closed).
    Blocked(Block),
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
    enabled: bool,
    /// Unix seconds.
    expire_at: Option<u64>,
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

    /// Whether access itself is blocked at `unix_ms` (before any budget question).
    fn access_block(&self, unix_ms: u64) -> Option<Block> {
        if !self.enabled {
            Some(Block::Disabled)
        } else if self
            .expire_at
            .is_some_and(|e| e.saturating_mul(1000) <= unix_ms)
        {
            Some(Block::Expired)
        } else {
            None
        }
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
    users: IdMap<UserId, UserLedger>,
    /// `(expire_at, user)` of every user with an expiry not yet acted on.
    expiries: BTreeSet<(u64, UserId)>,
    /// Users in [`Standing::Draining`] (so that idle loops skip the drain check).
    draining: usize,
    next_sync: Instant,
    next_drain_check: Instant,
}

impl Ledger {
    pub fn new(now: Instant) -> Ledger {
        Ledger {
            users: IdMap::default(),
            expiries: BTreeSet::new(),
            draining: 0,
            next_sync: now + ACCOUNTING_INTERVAL,
            next_drain_check: now,
        }
    }

    /// Takes the table's view of `user` (new users are added) at wall-clock time `unix_ms`.
    /// Returns what changed for the user's sessions: a disabled or expired user is closed at
    /// once; a user whose budget is spent is closed at once unless it is already limited (a
    /// drain in progress goes on); a blocked user with access and budget is readmitted.
    pub fn apply_table(&mut self, user: UserId, view: TableView, unix_ms: u64) -> Option<Verdict> {
        let entry = self.users.entry(user).or_insert(UserLedger {
            table_budget: None,
            resets: view.resets,
            pending_up: 0,
            pending_down: 0,
            standing: Standing::Admitted,
            enabled: true,
            expire_at: None,
        });
        entry.read_table(view.budget, view.resets);
        entry.enabled = view.enabled;
        if let Some(old) = std::mem::replace(&mut entry.expire_at, view.expire_at) {
            self.expiries.remove(&(old, user));
        }
        if let Some(at) = view.expire_at
            && at.saturating_mul(1000) > unix_ms
        {
            self.expiries.insert((at, user));
        }
        self.judge(user, unix_ms)
    }

    /// Forgets a user (deleted): its unsynced traffic goes with it.
    pub fn remove(&mut self, user: UserId) {
        if let Some(e) = self.users.remove(&user) {
            if matches!(e.standing, Standing::Draining { .. }) {
                self.draining -= 1;
            }
            if let Some(at) = e.expire_at {
                self.expiries.remove(&(at, user));
            }
        }
    }

    /// Whether `user` may open streams and handshakes now.
    pub fn admits(&self, user: UserId) -> bool {
        self.users
            .get(&user)
            .is_some_and(|e| e.standing == Standing::Admitted && e.effective_budget() != Some(0))
    }

    /// Why `user`'s handshakes are refused (`None`: admitted).
    pub fn refusal(&self, user: UserId) -> Option<RefuseReason> {
        match self.users.get(&user).map(|e| e.standing) {
            Some(Standing::Blocked(b)) => Some(b.refuse_reason()),
            _ if self.admits(user) => None,
            _ => Some(RefuseReason::QuotaExceeded),
        }
    }

    /// The bytes `user` may still move (`u64::MAX` when unlimited, 0 for unknown or blocked
    /// users).
    pub fn allowance(&self, user: UserId) -> u64 {
        self.users.get(&user).map_or(0, |e| match e.standing {
            Standing::Blocked(Block::Expired | Block::Disabled) => 0,
            _ => e.effective_budget().unwrap_or(u64::MAX),
        })
    }

    /// The users whose `expire_at` has come at `unix_ms`, with their verdicts (each expiry is
    /// acted on once; extending it through the table re-arms it).
    pub fn expire_due(&mut self, unix_ms: u64) -> Vec<(UserId, Verdict)> {
        let mut verdicts = Vec::new();
        while let Some(&(at, user)) = self.expiries.first() {
            if at.saturating_mul(1000) > unix_ms {
                break;
            }
            self.expiries.pop_first();
            if let Some(v) = self.judge(user, unix_ms) {
                verdicts.push((user, v));
            }
        }
        verdicts
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
                e.standing = Standing::Blocked(Block::Quota);
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
        unix_ms: u64,
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
                table.touch(user, unix_ms / 1000);
                e.pending_up = 0;
                e.pending_down = 0;
                e.read_table(table.budget(user), resets);
                synced.push(user);
            }
        }
        for user in synced {
            if let Some(v) = self.judge(user, unix_ms) {
                verdicts.push((user, v));
            }
        }
        verdicts
    }

    /// When the ledger next needs the loop (`now` is wall-clock time `unix_ms`): the periodic
    /// sync, the next drain check, or the next expiry.
    pub fn next_deadline(&self, now: Instant, unix_ms: u64) -> Instant {
        let mut at = if self.draining == 0 {
            self.next_sync
        } else {
            self.next_sync.min(self.next_drain_check)
        };
        if let Some(&(expire, _)) = self.expiries.first() {
            let left = Duration::from_millis(expire.saturating_mul(1000).saturating_sub(unix_ms));
            at = at.min(now + left.min(EXPIRY_RECHECK));
        }
        at
    }

    /// Moves `user` to the standing its access and budget call for.
    fn judge(&mut self, user: UserId, unix_ms: u64) -> Option<Verdict> {
        let e = self.users.get_mut(&user)?;
        let spent = e.effective_budget() == Some(0);
        let was_draining = matches!(e.standing, Standing::Draining { .. });
        let verdict = match (e.access_block(unix_ms), spent, e.standing) {
            (Some(b), _, Standing::Blocked(now)) if now == b => return None,
            (Some(b), _, _) => {
                e.standing = Standing::Blocked(b);
                Verdict::Close(b)
            }
            (None, false, Standing::Admitted)
            | (None, true, Standing::Draining { .. } | Standing::Blocked(Block::Quota)) => {
                return None;
            }
            (None, false, _) => {
                e.standing = Standing::Admitted;
                Verdict::Readmit
            }
            (None, true, _) => {
                e.standing = Standing::Blocked(Block::Quota);
                Verdict::Close(Block::Quota)
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
    /// The wall clock of most tests (unix milliseconds).
    const UNIX_MS: u64 = 1_700_000_000_000;

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
        ledger.apply_table(id, TableView::of(table.get(id).unwrap()), UNIX_MS)
    }

    fn sync(ledger: &mut Ledger, now: Instant, table: &mut UserTable) -> Vec<(UserId, Verdict)> {
        ledger.sync(now, 7000, || table)
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
        assert!(
            ledger.next_deadline(Instant::now(), UNIX_MS) <= t0,
            "checked at once"
        );
        assert_eq!(ledger.finish_drains(t0, |_| false), []);
        assert_eq!(
            ledger.next_deadline(Instant::now(), UNIX_MS),
            t0 + DRAIN_CHECK
        );
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
        assert_eq!(
            ledger.next_deadline(Instant::now(), UNIX_MS),
            t0 + ACCOUNTING_INTERVAL
        );
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
            let next = ledger.next_deadline(Instant::now(), UNIX_MS);
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
        table.reset(KEY, None).unwrap();
        assert_eq!(read(&mut ledger, &table, id), Some(Verdict::Readmit));
        assert!(ledger.admits(id));
        assert_eq!(ledger.allowance(id), 1000);
    }

    #[test]
    fn traffic_not_yet_synced_at_a_reset_counts_before_it() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        ledger.charge(t0, id, down(300));
        table.reset(KEY, None).unwrap(); // the API thread
        assert_eq!(read(&mut ledger, &table, id), None);
        assert_eq!(ledger.allowance(id), 1000, "a fresh start after the reset");
        sync(&mut ledger, t0 + ACCOUNTING_INTERVAL, &mut table);
        assert_eq!(counted(&table, id), (0, 0));
    }

    #[test]
    fn a_sync_between_a_reset_and_its_message_drops_the_pre_reset_traffic() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        ledger.charge(t0, id, down(300));
        table.reset(KEY, None).unwrap();
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
            ledger.next_deadline(Instant::now(), UNIX_MS),
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
        assert_eq!(
            read(&mut ledger, &table, id),
            Some(Verdict::Close(Block::Quota))
        );
        assert!(!ledger.admits(id));
        assert_eq!(read(&mut ledger, &table, id), None, "said once");
        // A new user whose budget is already spent is closed from the start.
        let other = table.create("ledger-test-key-other-0123".into(), None, Some(0), 0);
        let other = other.unwrap();
        assert_eq!(
            read(&mut ledger, &table, other),
            Some(Verdict::Close(Block::Quota))
        );
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
            ledger.next_deadline(Instant::now(), UNIX_MS),
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
        let none: Vec<(UserId, Verdict)> = ledger.sync(t1, 7000, || -> &mut UserTable {
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
            [(id, Verdict::Close(Block::Quota))],
            "the limit was lowered below the usage"
        );
        table.set_limit(KEY, Some(500)).unwrap();
        ledger.charge(t0, id, down(1));
        assert_eq!(sync(&mut ledger, t0, &mut table), [(id, Verdict::Readmit)]);
        assert_eq!(ledger.allowance(id), 399);
    }

    fn view(table: &UserTable, id: UserId) -> TableView {
        TableView::of(table.get(id).unwrap())
    }

    #[test]
    fn an_expiry_closes_at_its_instant_and_extending_it_readmits() {
        let (t0, mut table, id, mut ledger) = setup(None);
        let expire = UNIX_MS / 1000 + 10;
        let patch = |e: u64| crate::users::Patch {
            expire_at: Some(Some(e)),
            ..Default::default()
        };
        table.update(KEY, &patch(expire), 0).unwrap();
        assert_eq!(ledger.apply_table(id, view(&table, id), UNIX_MS), None);
        assert!(ledger.admits(id) && ledger.refusal(id).is_none());
        // The loop is woken at the expiry instant itself, without any API call.
        assert_eq!(
            ledger.next_deadline(t0, UNIX_MS + 9_500),
            t0 + Duration::from_millis(500)
        );
        assert_eq!(ledger.expire_due(expire * 1000 - 1), []);
        assert_eq!(
            ledger.expire_due(expire * 1000),
            [(id, Verdict::Close(Block::Expired))]
        );
        assert_eq!(ledger.refusal(id), Some(RefuseReason::Expired));
        assert!(!ledger.admits(id));
        assert_eq!(
            ledger.allowance(id),
            0,
            "an unlimited user moves nothing once expired"
        );
        assert_eq!(ledger.expire_due(expire * 1000 + 5000), [], "said once");
        assert_eq!(
            ledger.next_deadline(t0, expire * 1000),
            t0 + ACCOUNTING_INTERVAL,
            "no expiry left to wait for"
        );
        // A sync or an unrelated re-read keeps it expired.
        assert_eq!(
            ledger.apply_table(id, view(&table, id), expire * 1000),
            None
        );
        // Extending it lets the user back in.
        table.update(KEY, &patch(expire + 3600), 0).unwrap();
        assert_eq!(
            ledger.apply_table(id, view(&table, id), expire * 1000 + 1),
            Some(Verdict::Readmit)
        );
        assert!(ledger.admits(id) && ledger.refusal(id).is_none());
        assert_eq!(ledger.allowance(id), u64::MAX);
        // An expiry already in the past when read closes at once.
        table.update(KEY, &patch(expire - 1), 0).unwrap();
        assert_eq!(
            ledger.apply_table(id, view(&table, id), expire * 1000),
            Some(Verdict::Close(Block::Expired))
        );
    }

    #[test]
    fn disabling_closes_at_once_and_enabling_restores_the_budget_standing() {
        let (t0, mut table, id, mut ledger) = setup(Some(1000));
        let enabled = |on: bool| crate::users::Patch {
            enabled: Some(on),
            ..Default::default()
        };
        table.update(KEY, &enabled(false), 0).unwrap();
        assert_eq!(
            ledger.apply_table(id, view(&table, id), UNIX_MS),
            Some(Verdict::Close(Block::Disabled))
        );
        assert_eq!(ledger.refusal(id), Some(RefuseReason::Disabled));
        assert_eq!(ledger.allowance(id), 0);
        assert_eq!(Block::Disabled.close_reason(), CloseReason::UserDeleted);
        // Disabled wins over an expiry that comes meanwhile.
        table
            .update(
                KEY,
                &crate::users::Patch {
                    expire_at: Some(Some(UNIX_MS / 1000 + 1)),
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        assert_eq!(ledger.apply_table(id, view(&table, id), UNIX_MS), None);
        assert_eq!(ledger.expire_due(UNIX_MS + 2000), []);
        assert_eq!(ledger.refusal(id), Some(RefuseReason::Disabled));
        // Enabled again, but expired by now: refused as expired.
        table.update(KEY, &enabled(true), 0).unwrap();
        assert_eq!(
            ledger.apply_table(id, view(&table, id), UNIX_MS + 2000),
            Some(Verdict::Close(Block::Expired))
        );
        // Expiry removed, but the budget was spent while blocked: refused for the quota.
        table
            .update(
                KEY,
                &crate::users::Patch {
                    expire_at: Some(None),
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        table.add_traffic(id, 0, 1000);
        assert_eq!(
            ledger.apply_table(id, view(&table, id), UNIX_MS + 2000),
            Some(Verdict::Close(Block::Quota))
        );
        assert_eq!(ledger.refusal(id), Some(RefuseReason::QuotaExceeded));
        table.reset(KEY, None).unwrap();
        assert_eq!(
            ledger.apply_table(id, view(&table, id), UNIX_MS + 2000),
            Some(Verdict::Readmit)
        );
        assert!(ledger.admits(id));
        let _ = t0;
    }

    #[test]
    fn a_deleted_users_expiry_is_forgotten() {
        let (t0, mut table, id, mut ledger) = setup(None);
        let patch = crate::users::Patch {
            expire_at: Some(Some(UNIX_MS / 1000 + 1)),
            ..Default::default()
        };
        table.update(KEY, &patch, 0).unwrap();
        ledger.apply_table(id, view(&table, id), UNIX_MS);
        ledger.remove(id);
        assert_eq!(ledger.next_deadline(t0, UNIX_MS), t0 + ACCOUNTING_INTERVAL);
        assert_eq!(ledger.expire_due(UNIX_MS + 5000), []);
    }
}
