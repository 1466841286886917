//! The Postgres store against a real database: what its statements do when
//! they run at the same time, as the writer and the lease renewal do.

use std::time::Duration;

use chat_protocol::{NodeId, RoomId, UserId};
use chat_room_node::store::postgres::PgStore;
use chat_room_node::store::{RoomRows, Row, Store};
use chat_tests::fresh_database;

/// A small xorshift, so the orders are varied but the run repeatable.
struct Shuffle(u64);

impl Shuffle {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The writer's group commit and the bulk lease renewal both update many
/// lease rows of the same node. Taken in different orders they deadlocked
/// (Postgres breaks it after `deadlock_timeout`, 1 s, which stalled every
/// room of the node for that second under load). Both must lock in one
/// order, so neither ever fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commits_and_lease_renewals_never_deadlock() -> anyhow::Result<()> {
    let url = fresh_database().await?;
    let store = PgStore::connect(&url, 4).await?;
    let owner = NodeId::new("node-a")?;
    let ttl = Duration::from_secs(30);
    let user = UserId::new("ann")?;
    let mut leases = Vec::new();
    let mut rooms = Vec::new();
    for i in 0..200 {
        let room = RoomId::new(&format!("lock-{i:03}"))?;
        let epoch = store
            .acquire_lease(room.as_str(), &owner, ttl)
            .await?
            .ok_or_else(|| anyhow::anyhow!("lease of {room} not free"))?;
        leases.push((room.as_str().to_owned(), epoch));
        rooms.push(room);
    }
    let mut rng = Shuffle(0x2545_F491_4F6C_DD1D);
    let mut next_seq = vec![1u64; leases.len()];
    for round in 0..30 {
        // A group of half the rooms, in a random order, one row each ...
        let mut picked: Vec<usize> = (0..leases.len()).collect();
        rng.shuffle(&mut picked);
        picked.truncate(leases.len() / 2);
        let rows: Vec<Vec<Row>> = picked
            .iter()
            .map(|&i| {
                let seq = next_seq[i];
                next_seq[i] += 1;
                vec![Row {
                    seq,
                    id: format!("{}-{seq}", rooms[i]),
                    user: user.clone(),
                    text: format!("round {round}"),
                    client_id: format!("c{round}"),
                }]
            })
            .collect();
        let batches: Vec<RoomRows<'_>> = picked
            .iter()
            .zip(&rows)
            .map(|(&i, rows)| RoomRows {
                room: &rooms[i],
                epoch: leases[i].1,
                rows,
            })
            .collect();
        // ... while every lease is renewed in another order.
        let mut all = leases.clone();
        rng.shuffle(&mut all);
        let (committed, renewed) = tokio::join!(
            store.commit(&owner, &batches, ttl, 1_000 + round),
            store.renew_leases(&owner, &all, ttl),
        );
        let fenced = committed.map_err(|e| anyhow::anyhow!("round {round}: commit: {e}"))?;
        anyhow::ensure!(fenced.is_empty(), "round {round}: fenced {fenced:?}");
        let held = renewed.map_err(|e| anyhow::anyhow!("round {round}: renewal: {e}"))?;
        anyhow::ensure!(
            held.len() == leases.len(),
            "round {round}: held {}",
            held.len()
        );
    }
    // Every row of every round is there.
    let pool = sqlx::PgPool::connect(&url).await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&pool)
        .await?;
    let expected: u64 = next_seq.iter().map(|s| s - 1).sum();
    anyhow::ensure!(stored as u64 == expected, "{stored} rows of {expected}");
    Ok(())
}

/// The shard count of a big room is written under the sequencer's lease:
/// a node that lost the lease cannot change it, and the next owner loads
/// what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_counts_are_fenced_by_the_lease_and_survive_a_takeover() -> anyhow::Result<()> {
    let url = fresh_database().await?;
    let store = PgStore::connect(&url, 4).await?;
    let (a, b) = (NodeId::new("node-a")?, NodeId::new("node-b")?);
    let room = RoomId::new("big")?;
    anyhow::ensure!(store.load_room(&room, 10, 10).await?.shards == 1, "unsplit");
    // A lease that expires at once, so node-b can take it over.
    let epoch_a = store
        .acquire_lease(room.as_str(), &a, Duration::from_millis(1))
        .await?
        .ok_or_else(|| anyhow::anyhow!("lease not free"))?;
    anyhow::ensure!(
        store.set_shards(&room, &a, epoch_a, 3).await?,
        "owner writes"
    );
    anyhow::ensure!(
        store.load_room(&room, 10, 10).await?.shards == 3,
        "3 loaded"
    );
    let epoch_b = chat_tests::wait_for(
        "node-b takes the expired lease",
        Duration::from_secs(10),
        || {
            let (store, room, b) = (&store, &room, &b);
            async move {
                Ok(store
                    .acquire_lease(room.as_str(), b, Duration::from_secs(30))
                    .await?)
            }
        },
    )
    .await?;
    anyhow::ensure!(epoch_b > epoch_a, "epoch bumped");
    anyhow::ensure!(
        !store.set_shards(&room, &a, epoch_a, 5).await?,
        "the old owner is fenced"
    );
    anyhow::ensure!(store.load_room(&room, 10, 10).await?.shards == 3, "still 3");
    anyhow::ensure!(
        store.set_shards(&room, &b, epoch_b, 5).await?,
        "new owner writes"
    );
    anyhow::ensure!(
        store.load_room(&room, 10, 10).await?.shards == 5,
        "5 loaded"
    );
    Ok(())
}

/// The seqs stored for `room` after `after`, in order.
async fn seqs_after(store: &PgStore, room: &RoomId, after: u64) -> anyhow::Result<Vec<u64>> {
    let page = chat_room_node::store::Page {
        before: None,
        after: Some(after),
        limit: 500,
    };
    let (msgs, _) = store.history(room, page).await?;
    Ok(msgs.iter().map(|m| m.seq).collect())
}

/// A busy room hands the writer several batches at once, and they share a
/// group commit: the same room (and lease) appears more than once in one
/// statement. Every row of every batch is written, in seq order, and the
/// room is fenced in none of them; a stale epoch fences all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_commit_takes_several_batches_of_one_room() -> anyhow::Result<()> {
    let url = fresh_database().await?;
    let store = PgStore::connect(&url, 4).await?;
    let owner = NodeId::new("node-a")?;
    let ttl = Duration::from_secs(30);
    let user = UserId::new("ann")?;
    let room = RoomId::new("busy")?;
    let other = RoomId::new("quiet")?;
    let epoch = store
        .acquire_lease(room.as_str(), &owner, ttl)
        .await?
        .ok_or_else(|| anyhow::anyhow!("lease not free"))?;
    let other_epoch = store
        .acquire_lease(other.as_str(), &owner, ttl)
        .await?
        .ok_or_else(|| anyhow::anyhow!("lease not free"))?;
    let rows = |from: u64| -> Vec<Row> {
        (from..from + 50)
            .map(|seq| Row {
                seq,
                id: format!("busy-{seq}"),
                user: user.clone(),
                text: format!("message {seq}"),
                client_id: format!("c{seq}"),
            })
            .collect()
    };
    let (b1, b2, b3) = (rows(1), rows(51), rows(101));
    let quiet = vec![Row {
        seq: 1,
        id: "quiet-1".into(),
        user: user.clone(),
        text: "hello".into(),
        client_id: "q1".into(),
    }];
    let batch = |room, epoch, rows| RoomRows { room, epoch, rows };
    let fenced = store
        .commit(
            &owner,
            &[
                batch(&room, epoch, &b1),
                batch(&other, other_epoch, &quiet),
                batch(&room, epoch, &b2),
                batch(&room, epoch, &b3),
            ],
            ttl,
            1_000,
        )
        .await?;
    anyhow::ensure!(fenced.is_empty(), "fenced {fenced:?}");
    let seqs = seqs_after(&store, &room, 0).await?;
    anyhow::ensure!(seqs == (1..=150).collect::<Vec<_>>(), "seqs {seqs:?}");
    // Under an epoch the room no longer holds, every batch is fenced.
    let (b4, b5) = (rows(151), rows(201));
    let fenced = store
        .commit(
            &owner,
            &[batch(&room, epoch + 1, &b4), batch(&room, epoch + 1, &b5)],
            ttl,
            2_000,
        )
        .await?;
    anyhow::ensure!(fenced == vec![0, 1], "fenced {fenced:?}");
    anyhow::ensure!(
        store.load_room(&room, 10, 10).await?.last_seq == 150,
        "nothing written under a stale epoch"
    );
    // The node takes the room again (a new actor, epoch + 1) while the old
    // actor still has a batch queued: both land in one commit, and only
    // the current epoch's rows are written, though their seqs do not clash.
    let epoch2 = store
        .acquire_lease(room.as_str(), &owner, ttl)
        .await?
        .ok_or_else(|| anyhow::anyhow!("own lease not renewable"))?;
    anyhow::ensure!(epoch2 == epoch + 1, "epoch {epoch2}");
    let (stale, current) = (rows(151), rows(201));
    let fenced = store
        .commit(
            &owner,
            &[batch(&room, epoch, &stale), batch(&room, epoch2, &current)],
            ttl,
            3_000,
        )
        .await?;
    anyhow::ensure!(fenced == vec![0], "fenced {fenced:?}");
    let seqs = seqs_after(&store, &room, 150).await?;
    anyhow::ensure!(
        seqs == (201..=250).collect::<Vec<_>>(),
        "only the current epoch's rows: {seqs:?}"
    );
    Ok(())
}
