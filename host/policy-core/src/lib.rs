//! The default room policy, as plain Rust: what one tick of a room delivers.
//!
//! Used natively by the edge (its built-in and fallback policy) and compiled
//! to Wasm in `modules/policy-default`, so both run the same algorithm.
//!
//! Per tick:
//! 1. Work out the viewer budget for this tick. Two limits hold together: a
//!    token bucket (a quarter of the cap, but at least one tick's share,
//!    refilled at the cap) spreads messages over the second instead of one
//!    burst, and a sliding
//!    one-second log of what went out (in tick time) makes "at most `cap`
//!    messages in any one-second window" exact.
//! 2. Host and system messages always go out (they spend budget, into debt
//!    if need be, so what follows keeps the bound); the newest host message
//!    is pinned.
//! 3. Likes become a counter; gifts are counted by name.
//! 4. Gifts, then chat, share the remaining budget round-robin across
//!    senders: every sender's first message before anyone's second, so one
//!    spammer cannot fill the screen.
//! 5. Deliveries keep arrival order.

use std::collections::VecDeque;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Chat,
    Like,
    Gift,
    Host,
    System,
}

impl Kind {
    /// The kind's code in the `inbound` record of `wit/throng.wit` (the
    /// `kind` enum's discriminant).
    pub fn code(self) -> u8 {
        match self {
            Kind::Chat => 0,
            Kind::Like => 1,
            Kind::Gift => 2,
            Kind::Host => 3,
            Kind::System => 4,
        }
    }

    /// The kind for a code; an unknown code is the least privileged kind, chat.
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => Kind::Like,
            2 => Kind::Gift,
            3 => Kind::Host,
            4 => Kind::System,
            _ => Kind::Chat,
        }
    }
}

/// "Not a gift" in a gift-index list.
pub const NO_GIFT: u32 = u32::MAX;

/// A tick's inbound metadata as parallel slices (the shape it crosses into
/// Wasm in), read as one [`Meta`] per message, up to the shortest slice.
#[derive(Debug, Clone, Copy)]
pub struct Columns<'a> {
    pub senders: &'a [u64],
    pub kinds: &'a [u8],
    pub sizes: &'a [u32],
    pub received_ms: &'a [u64],
    pub gifts: &'a [u32],
    pub gift_names: &'a [String],
}

impl<'a> Columns<'a> {
    pub fn metas(&self) -> Vec<Meta<'a>> {
        let n = self
            .senders
            .len()
            .min(self.kinds.len())
            .min(self.sizes.len())
            .min(self.received_ms.len())
            .min(self.gifts.len());
        (0..n)
            .map(|i| Meta {
                sender: self.senders[i],
                kind: Kind::from_code(self.kinds[i]),
                size: self.sizes[i],
                received_ms: self.received_ms[i],
                gift: self.gift_names.get(self.gifts[i] as usize).map_or("", String::as_str),
            })
            .collect()
    }
}

/// What the policy knows of one inbound message.
#[derive(Debug, Clone, Copy)]
pub struct Meta<'a> {
    pub sender: u64,
    pub kind: Kind,
    pub size: u32,
    pub received_ms: u64,
    pub gift: &'a str,
}

/// One tick's decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Indices into the inbound list, ascending.
    pub deliver: Vec<u32>,
    pub likes: u64,
    /// Gift name and count, in order of first appearance.
    pub gifts: Vec<(String, u64)>,
    /// Indices (also in `deliver`) to pin.
    pub pinned: Vec<u32>,
}

/// Longest gift name counted; longer names are cut.
pub const MAX_GIFT_NAME: usize = 32;

/// The default policy's state for one room.
#[derive(Debug, Clone)]
pub struct DefaultPolicy {
    cap_per_sec: u32,
    burst: f64,
    credit: f64,
    /// Tick time: the sum of tick lengths seen so far.
    clock_ms: u64,
    /// When each message of the last second went out (tick time).
    shown: VecDeque<u64>,
}

impl DefaultPolicy {
    /// `cap_per_sec == 0` turns the cap off.
    pub fn new(cap_per_sec: u32) -> Self {
        let burst = (f64::from(cap_per_sec) / 4.0).floor().max(1.0);
        Self {
            cap_per_sec,
            burst,
            credit: burst,
            clock_ms: 0,
            shown: VecDeque::new(),
        }
    }

    /// Builds the policy from `key = value` params. Known key:
    /// `cap_per_sec` (messages a viewer is shown per second; default 20; 0 = off).
    pub fn from_params<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut cap = 20u32;
        for (k, v) in params {
            match k {
                "cap_per_sec" => {
                    cap = v
                        .trim()
                        .parse()
                        .map_err(|_| format!("cap_per_sec: `{v}` is not a whole number"))?;
                    if cap > 100_000 {
                        return Err(format!("cap_per_sec: {cap} is above 100000"));
                    }
                }
                other => return Err(format!("unknown param `{other}` (known: cap_per_sec)")),
            }
        }
        Ok(Self::new(cap))
    }

    pub fn cap_per_sec(&self) -> u32 {
        self.cap_per_sec
    }

    /// Decides one tick.
    pub fn plan(&mut self, tick_ms: u32, inbound: &[Meta<'_>]) -> Plan {
        let mut plan = Plan::default();
        let capped = self.cap_per_sec > 0;
        if capped {
            self.clock_ms += u64::from(tick_ms);
            let share = f64::from(self.cap_per_sec) * f64::from(tick_ms) / 1000.0;
            // Slow ticks (huge rooms) need a bucket that holds a whole tick's
            // share, or viewers would see less than the cap.
            let burst = self.burst.max(share.floor());
            self.credit = (self.credit + share).min(burst);
            while self.shown.front().is_some_and(|&t| t + 1000 <= self.clock_ms) {
                self.shown.pop_front();
            }
        }
        let mut gifts: Vec<usize> = Vec::new();
        let mut chats: Vec<usize> = Vec::new();
        let mut last_host = None;
        for (i, m) in inbound.iter().enumerate() {
            match m.kind {
                Kind::Host | Kind::System => {
                    plan.deliver.push(i as u32);
                    if m.kind == Kind::Host {
                        last_host = Some(i as u32);
                    }
                    if capped {
                        self.credit -= 1.0;
                        self.shown.push_back(self.clock_ms);
                    }
                }
                Kind::Like => plan.likes += 1,
                Kind::Gift => {
                    count_gift(&mut plan.gifts, m.gift);
                    gifts.push(i);
                }
                Kind::Chat => chats.push(i),
            }
        }
        plan.pinned.extend(last_host);
        for group in [gifts, chats] {
            if !capped {
                plan.deliver.extend(group.iter().map(|&i| i as u32));
                continue;
            }
            let window_room = (self.cap_per_sec as usize).saturating_sub(self.shown.len());
            let room = (self.credit.floor().max(0.0) as usize).min(window_room);
            if room == 0 {
                continue;
            }
            let picked = round_robin(inbound, &group, room);
            self.credit -= picked.len() as f64;
            for _ in &picked {
                self.shown.push_back(self.clock_ms);
            }
            plan.deliver.extend(picked);
        }
        plan.deliver.sort_unstable();
        plan
    }
}

fn count_gift(gifts: &mut Vec<(String, u64)>, name: &str) {
    let mut end = name.len().min(MAX_GIFT_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let name = &name[..end];
    match gifts.iter_mut().find(|(g, _)| g == name) {
        Some((_, n)) => *n += 1,
        None => gifts.push((name.to_owned(), 1)),
    }
}

/// Up to `room` indices from `group` (ascending indices into `inbound`),
/// fairly across senders: each round takes every sender's earliest message
/// not yet taken, in order, before any sender's next one.
///
/// `room` is small (a tick's share of the cap), so a linear scan with a short
/// list of this round's senders beats hashing every message.
fn round_robin(inbound: &[Meta<'_>], group: &[usize], room: usize) -> Vec<u32> {
    if group.len() <= room {
        return group.iter().map(|&i| i as u32).collect();
    }
    let mut taken = vec![false; group.len()];
    let mut picked = Vec::with_capacity(room);
    let mut round: Vec<u64> = Vec::with_capacity(room);
    while picked.len() < room {
        round.clear();
        for (j, &i) in group.iter().enumerate() {
            let sender = inbound[i].sender;
            if taken[j] || round.contains(&sender) {
                continue;
            }
            taken[j] = true;
            round.push(sender);
            picked.push(i as u32);
            if picked.len() == room {
                break;
            }
        }
        if round.is_empty() {
            break;
        }
    }
    picked.sort_unstable();
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(sender: u64, kind: Kind) -> Meta<'static> {
        Meta {
            sender,
            kind,
            size: 10,
            received_ms: 0,
            gift: if kind == Kind::Gift { "rose" } else { "" },
        }
    }

    #[test]
    fn uncapped_delivers_all_but_likes_and_counts() {
        let mut p = DefaultPolicy::new(0);
        let plan = p.plan(
            50,
            &[m(1, Kind::Chat), m(1, Kind::Like), m(2, Kind::Gift), m(3, Kind::Host)],
        );
        assert_eq!(plan.deliver, vec![0, 2, 3]);
        assert_eq!(plan.likes, 1);
        assert_eq!(plan.gifts, vec![("rose".to_owned(), 1)]);
        assert_eq!(plan.pinned, vec![3]);
    }

    #[test]
    fn every_one_second_window_holds_at_most_the_cap() {
        let mut p = DefaultPolicy::new(20);
        let mut per_tick = Vec::new();
        for tick in 0..100 {
            let mut inbound = vec![m(tick % 7, Kind::Chat); 50];
            if tick % 10 == 0 {
                inbound.push(m(99, Kind::Host));
            }
            let plan = p.plan(100, &inbound);
            if tick % 10 == 0 {
                assert!(plan.deliver.contains(&50), "host message dropped at tick {tick}");
            }
            per_tick.push(plan.deliver.len());
        }
        for w in per_tick.windows(10) {
            let n: usize = w.iter().sum();
            assert!(n <= 20, "{n} in one second");
        }
        let total: usize = per_tick.iter().sum();
        assert!(total >= 190, "the cap should be used: {total} in 10 s");
    }

    #[test]
    fn a_spammer_cannot_fill_the_screen() {
        let mut p = DefaultPolicy::new(20); // burst of 5 on the first tick
        let mut inbound = vec![m(666, Kind::Chat); 100];
        inbound.extend([m(1, Kind::Chat), m(2, Kind::Chat), m(3, Kind::Chat)]);
        let plan = p.plan(1, &inbound);
        assert_eq!(plan.deliver.len(), 5);
        for quiet in [100, 101, 102] {
            assert!(
                plan.deliver.contains(&quiet),
                "sender of #{quiet} was crowded out: {:?}",
                plan.deliver
            );
        }
    }

    #[test]
    fn gifts_come_before_chat_when_the_budget_is_short() {
        let mut p = DefaultPolicy::new(4); // burst 1
        let plan = p.plan(1, &[m(1, Kind::Chat), m(2, Kind::Gift)]);
        assert_eq!(plan.deliver, vec![1]);
        let mut p = DefaultPolicy::new(1);
        let plan = p.plan(1, &[m(1, Kind::Chat), m(2, Kind::Gift)]);
        assert_eq!(plan.deliver, vec![1]);
        assert_eq!(plan.gifts, vec![("rose".to_owned(), 1)]);
    }

    #[test]
    fn a_cap_of_one_keeps_delivering_one_a_second() {
        let mut p = DefaultPolicy::new(1);
        let mut delivered = Vec::new();
        for tick in 0..50u64 {
            let plan = p.plan(100, &[m(tick, Kind::Chat)]);
            if !plan.deliver.is_empty() {
                delivered.push(tick);
            }
        }
        // Ticks of 100 ms: one message per ten ticks, never two within a second.
        assert!(delivered.len() >= 4, "{delivered:?}");
        assert!(delivered.windows(2).all(|w| w[1] - w[0] >= 10), "{delivered:?}");
    }

    #[test]
    fn slow_ticks_still_show_the_whole_cap() {
        let mut p = DefaultPolicy::new(20);
        let inbound: Vec<_> = (0..100).map(|s| m(s, Kind::Chat)).collect();
        let per_tick: Vec<usize> = (0..10).map(|_| p.plan(500, &inbound).deliver.len()).collect();
        // 500 ms ticks: 10 a tick is 20 a second, the cap, and never more.
        assert!(per_tick.iter().all(|&n| n == 10), "{per_tick:?}");
    }

    #[test]
    fn params_are_checked() {
        assert_eq!(
            DefaultPolicy::from_params([("cap_per_sec", "7")]).map(|p| p.cap_per_sec()),
            Ok(7)
        );
        assert!(DefaultPolicy::from_params([("cap_per_sec", "lots")]).is_err());
        assert!(DefaultPolicy::from_params([("colour", "red")]).is_err());
    }
}
