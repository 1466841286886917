//! Member shards of big rooms: which shard a user belongs to, and the ring
//! key each shard is placed under.
//!
//! A room past `CHAT_SHARD_THRESHOLD` members splits its members over
//! `shards` member shards (DESIGN, "Big rooms"). Every gateway and room
//! node must put a user in the same shard without talking, and growing the
//! shard count must move as few users as possible (their roster entries,
//! presence and rate-limit state move with them). So the shard is a jump
//! consistent hash (Lamping and Veach, 2014) of a stable hash of the user
//! id: deterministic across processes and builds, even, and growing from
//! `n` to `n + 1` shards moves about `1 / (n + 1)` of the users, each of
//! them to the new shard only. `hash mod n` would move almost everyone.

use crate::ids::{RoomId, UserId};

/// 64-bit FNV-1a of `bytes`: stable across processes, platforms and Rust
/// versions (std's hasher is randomly keyed per process).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Jump consistent hash of `key` into `0..buckets` (`buckets` ≥ 1).
fn jump(mut key: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        // (key >> 33) + 1 is at most 2^31, so the quotient is finite and
        // at least 1.
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    // b < buckets ≤ u32::MAX, and b ≥ 0 since the loop ran at least once.
    b as u32
}

/// The member shard of `user` in a room split into `shards` shards
/// (`0..shards`). A room that is not split (`shards` 0 or 1) has only
/// shard 0.
pub fn user_shard(user: &UserId, shards: u32) -> u32 {
    if shards <= 1 {
        return 0;
    }
    jump(fnv1a64(user.as_str().as_bytes()), shards)
}

/// The placement key of member shard `shard` of `room`: `room#shard`.
/// `#` cannot appear in a room name, so a shard key never collides with a
/// room's own key.
pub fn shard_key(room: &RoomId, shard: u32) -> String {
    format!("{}#{shard}", room.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(n: usize) -> Vec<UserId> {
        (0..n)
            .map(|i| UserId::new(&format!("user-{i}")).unwrap())
            .collect()
    }

    #[test]
    fn unsplit_rooms_have_one_shard() {
        let u = UserId::new("ann").unwrap();
        assert_eq!(user_shard(&u, 0), 0);
        assert_eq!(user_shard(&u, 1), 0);
    }

    #[test]
    fn the_hash_is_stable_across_processes() {
        // FNV-1a 64 test vectors; a change here would re-shard every room.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // Same user, same shard, whatever else was computed before.
        let u = UserId::new("user-42").unwrap();
        let first = user_shard(&u, 16);
        for _ in 0..3 {
            assert_eq!(user_shard(&u, 16), first);
        }
    }

    #[test]
    fn users_spread_evenly() {
        let all = users(50_000);
        for shards in [2u32, 3, 10, 16] {
            let mut counts = vec![0usize; shards as usize];
            for u in &all {
                let s = user_shard(u, shards);
                assert!(s < shards);
                counts[s as usize] += 1;
            }
            let mean = all.len() as f64 / f64::from(shards);
            for c in counts {
                let off = (c as f64 - mean).abs() / mean;
                assert!(off < 0.05, "{shards} shards: {c} vs mean {mean}");
            }
        }
    }

    #[test]
    fn growing_moves_few_users_and_only_to_the_new_shard() {
        let all = users(50_000);
        for n in [1u32, 2, 5, 9, 15] {
            let mut moved = 0usize;
            for u in &all {
                let before = user_shard(u, n);
                let after = user_shard(u, n + 1);
                if before != after {
                    assert_eq!(after, n, "a user may only move to the new shard");
                    moved += 1;
                }
            }
            let share = moved as f64 / all.len() as f64;
            let ideal = 1.0 / f64::from(n + 1);
            assert!(
                (share - ideal).abs() < 0.02,
                "{n} -> {}: {share:.3} moved, ideal {ideal:.3}",
                n + 1
            );
        }
    }

    #[test]
    fn shard_keys_never_collide_with_room_names() {
        let room = RoomId::new("launch").unwrap();
        assert_eq!(shard_key(&room, 3), "launch#3");
        assert!(RoomId::new(&shard_key(&room, 0)).is_err());
    }
}
