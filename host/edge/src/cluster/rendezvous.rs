//! Which edge is a room's origin: rendezvous (highest random weight)
//! hashing of the tenant-qualified room over the live edges.
//!
//! Every edge that sees the same live set picks the same origin without
//! asking anyone, and when an edge leaves only its own rooms move (to each
//! room's next edge in its order); when one joins, it takes only the rooms
//! it now wins.

use sha2::{Digest, Sha256};

/// The key a room is hashed by: its tenant and its name (two tenants'
/// rooms of one name are two rooms). The tenant's length comes first so
/// no tenant and room pair reads as another.
pub use throng_wire::bus::room_key;

/// An edge's weight for a room. A cryptographic hash so the weights do not
/// depend on the Rust version or the machine: edges built apart must agree.
fn weight(edge_id: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update((edge_id.len() as u64).to_be_bytes());
    h.update(edge_id.as_bytes());
    h.update(key.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The edges in the order they take the room on: the origin first, then
/// who takes over if it dies, and so on. Ties (never in practice) go to
/// the smaller id so every edge still agrees.
pub fn order<'a>(key: &str, edges: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut weighted: Vec<(u64, &str)> = edges.into_iter().map(|e| (weight(e, key), e)).collect();
    weighted.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    weighted.into_iter().map(|(_, e)| e).collect()
}

/// The room's origin among `edges`, or None if there are none.
pub fn origin<'a>(key: &str, edges: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    edges
        .into_iter()
        .map(|e| (weight(e, key), e))
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn edges(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("edge-{i}")).collect()
    }

    #[test]
    fn every_edge_agrees_whatever_order_it_lists_the_others_in() {
        let e = edges(7);
        let mut reversed = e.clone();
        reversed.reverse();
        for r in 0..200 {
            let key = room_key("acme", &format!("room-{r}"));
            let a = origin(&key, e.iter().map(String::as_str));
            let b = origin(&key, reversed.iter().map(String::as_str));
            assert_eq!(a, b);
            assert_eq!(a, order(&key, e.iter().map(String::as_str)).first().copied());
        }
    }

    #[test]
    fn rooms_spread_over_the_edges() {
        let e = edges(4);
        let mut count: HashMap<&str, usize> = HashMap::new();
        for r in 0..4000 {
            let key = room_key("acme", &format!("room-{r}"));
            *count
                .entry(origin(&key, e.iter().map(String::as_str)).unwrap())
                .or_default() += 1;
        }
        assert_eq!(count.len(), 4);
        for (edge, n) in count {
            assert!((800..1200).contains(&n), "{edge} got {n} of 4000 rooms");
        }
    }

    #[test]
    fn an_edge_leaving_moves_only_its_own_rooms_to_their_next_edge() {
        let e = edges(5);
        let all: Vec<&str> = e.iter().map(String::as_str).collect();
        let without: Vec<&str> = all.iter().copied().filter(|&x| x != "edge-2").collect();
        for r in 0..1000 {
            let key = room_key("acme", &format!("room-{r}"));
            let before = order(&key, all.iter().copied());
            let after = origin(&key, without.iter().copied()).unwrap();
            if before[0] == "edge-2" {
                assert_eq!(after, before[1], "a dead origin's room goes to its next edge");
            } else {
                assert_eq!(after, before[0], "a room whose origin lives stays put");
            }
        }
    }

    #[test]
    fn tenants_are_part_of_the_key() {
        assert_ne!(room_key("a", "b/c"), room_key("a/b", "c"));
        let e = edges(16);
        let differs = (0..100).any(|r| {
            let room = format!("room-{r}");
            origin(&room_key("t1", &room), e.iter().map(String::as_str))
                != origin(&room_key("t2", &room), e.iter().map(String::as_str))
        });
        assert!(differs);
        assert_eq!(origin("k", std::iter::empty()), None);
    }
}
