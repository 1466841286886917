//! Where a request's answer goes. A single request carries a bus subject.
//! A batch (one bus request carrying many sends of one gateway, see
//! [`chat_protocol::bus::encode_batch`]) gives each of its sends a
//! [`Slot`] in one shared reply, which is published once every slot is
//! answered: the gateway then gets one bus message per batch, not one per
//! send, and the bus carries a fraction of the messages it did.
//!
//! A slot dropped unanswered (its room ended with the send queued, say)
//! answers `not_owner`, which the gateway retries like any other
//! `not_owner`; sends are safe to repeat. A batch waits at most
//! [`BATCH_DEADLINE`] for its slowest send: then the sends not yet
//! answered answer `pending` and the gateway asks again for those, so a
//! stalled room (waiting for a lease, say) holds up nobody else's ack.
//! So a batch reply always goes out, and soon, whatever becomes of its
//! sends.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chat_protocol::bus::{encode_batch_reply, encode_reply, ReplyHead, BATCH_DEADLINE};

use crate::bus::{Bus, BusError};

/// Where one answer goes.
#[derive(Debug)]
pub enum Reply {
    /// Publish the answer on this subject.
    Subject(String),
    /// Fill this slot of a batch reply.
    Slot(Slot),
}

impl From<String> for Reply {
    fn from(subject: String) -> Self {
        Self::Subject(subject)
    }
}

impl From<&str> for Reply {
    fn from(subject: &str) -> Self {
        Self::Subject(subject.to_owned())
    }
}

impl Reply {
    /// Answers with `head` and `frames`. A slot takes only a head: batches
    /// carry only sends, whose answers have no frames.
    ///
    /// # Errors
    /// When the bus refuses a subject's answer (a slot's answer is
    /// published with its batch; see [`batch`]).
    pub async fn send(
        self,
        bus: &Arc<dyn Bus>,
        head: &ReplyHead,
        frames: &[Bytes],
    ) -> Result<(), BusError> {
        match self {
            Self::Subject(to) => bus.publish(to, encode_reply(head, frames)).await,
            Self::Slot(slot) => {
                debug_assert!(frames.is_empty(), "a batch slot answers a send");
                slot.fill(head);
                Ok(())
            }
        }
    }
}

/// The shared reply of one batch: one answer per send, in the batch's
/// order. Published once: when the last [`Slot`] is answered or dropped,
/// or at [`BATCH_DEADLINE`] with the sends still unanswered as
/// [`ReplyHead::Pending`], whichever comes first.
struct Shared {
    to: String,
    bus: Arc<dyn Bus>,
    /// `None` once published.
    answers: Mutex<Option<Vec<Option<ReplyHead>>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("to", &self.to).finish()
    }
}

impl Shared {
    /// Publishes the answers, if nobody did yet; `missing` stands for the
    /// slots not answered.
    fn publish(&self, missing: &ReplyHead) {
        let taken = self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(answers) = taken else { return };
        let payload = encode_batch_reply(answers.iter().map(|a| a.as_ref().unwrap_or(missing)));
        let (bus, to) = (self.bus.clone(), self.to.clone());
        // Called by whoever answered last (or the deadline), inside the
        // runtime; without one (a test tearing down) nobody is left to
        // answer.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = bus.publish(to, payload).await {
                    tracing::warn!(error = %e, "batch reply lost; the gateway will retry");
                }
            });
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every slot is answered or dropped: a dropped one asks for a retry.
        self.publish(&ReplyHead::NotOwner);
    }
}

/// One send's place in a batch reply.
#[derive(Debug)]
pub struct Slot {
    batch: Arc<Shared>,
    index: usize,
}

impl Slot {
    /// Records the answer; the batch goes out when it has them all. An
    /// answer after the deadline is dropped: the gateway has asked again.
    pub fn fill(self, head: &ReplyHead) {
        let mut answers = self.batch.answers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(answers) = answers.as_mut() {
            answers[self.index] = Some(head.clone());
        }
    }
}

/// The `n` slots of a batch whose one reply goes to `to` on `bus`.
pub fn batch(bus: Arc<dyn Bus>, to: String, n: usize) -> Vec<Slot> {
    let shared = Arc::new(Shared {
        to,
        bus,
        answers: Mutex::new(Some(vec![None; n])),
    });
    let deadline = Arc::downgrade(&shared);
    tokio::spawn(async move {
        tokio::time::sleep(BATCH_DEADLINE).await;
        if let Some(shared) = deadline.upgrade() {
            shared.publish(&ReplyHead::Pending);
        }
    });
    (0..n)
        .map(|index| Slot {
            batch: shared.clone(),
            index,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use chat_protocol::bus::decode_batch_reply;
    use futures::StreamExt as _;

    #[tokio::test]
    async fn a_batch_answers_once_with_every_slot_in_order() {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let mut sub = bus.subscribe("r".into()).await.unwrap();
        let mut slots = batch(bus.clone(), "r".into(), 3).into_iter();
        let (a, b, c) = (
            slots.next().unwrap(),
            slots.next().unwrap(),
            slots.next().unwrap(),
        );
        let ack = |seq| ReplyHead::Ack {
            seq,
            id: format!("m{seq}"),
            duplicate: false,
        };
        Reply::Slot(c).send(&bus, &ack(9), &[]).await.unwrap();
        a.fill(&ack(7));
        // `b` is dropped unanswered: it answers `not_owner` (retry).
        drop(b);
        let msg = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
            .await
            .expect("the batch reply comes")
            .unwrap();
        let heads: Vec<ReplyHead> = decode_batch_reply(&msg.payload, 3)
            .unwrap()
            .iter()
            .map(|p| chat_protocol::bus::decode_reply(p).unwrap().0)
            .collect();
        assert_eq!(heads, vec![ack(7), ReplyHead::NotOwner, ack(9)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_send_answers_pending_at_the_deadline_and_holds_up_nobody() {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let mut sub = bus.subscribe("r".into()).await.unwrap();
        let mut slots = batch(bus.clone(), "r".into(), 2).into_iter();
        let (fast, slow) = (slots.next().unwrap(), slots.next().unwrap());
        let ack = ReplyHead::Ack {
            seq: 1,
            id: "m1".into(),
            duplicate: false,
        };
        fast.fill(&ack);
        let started = tokio::time::Instant::now();
        let msg = sub.next().await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= BATCH_DEADLINE && waited < BATCH_DEADLINE * 2,
            "{waited:?}"
        );
        let heads: Vec<ReplyHead> = decode_batch_reply(&msg.payload, 2)
            .unwrap()
            .iter()
            .map(|p| chat_protocol::bus::decode_reply(p).unwrap().0)
            .collect();
        assert_eq!(heads, vec![ack.clone(), ReplyHead::Pending]);
        // The late answer goes nowhere: the reply is out.
        slow.fill(&ack);
        tokio::task::yield_now().await;
        let next = tokio::time::timeout(BATCH_DEADLINE * 2, sub.next()).await;
        assert!(next.is_err(), "one reply per batch");
    }
}
