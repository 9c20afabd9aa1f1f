//! One-to-one messaging between in-process nodes on loopback: encrypted delivery, receipts,
//! order, dedup, offline queueing, typing, limits and hostile input.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use tern_node::{
    events::EventKind,
    messaging::{
        contacts::{BlockedPeer, Contact},
        db::MessagingDb,
        wire::{self, MAX_TEXT_BYTES, RejectReason, Response},
    },
    store::Store,
};
use tern_tests::{TestNode, eventually};

const LONG: Duration = Duration::from_secs(60);

fn all(h: &[tern_node::messaging::HistoryItem], n: usize, state: &str) -> bool {
    h.len() == n && h.iter().all(|m| m.state == state)
}

#[tokio::test]
async fn alice_and_bob_talk_with_receipts_and_a_message_request() {
    let mut a = TestNode::spawn("alice").await;
    let mut b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    let shown = a.handle.contact_show("bob").await.unwrap();
    assert_eq!(shown.peer_id, b.handle.peer_id().to_string());

    let id = a.handle.send("bob", "hi bob").await.unwrap().to_hex();
    // Bob's node receives it from a stranger: a message request contact named by alice's profile.
    let (from, text) = b
        .wait_for("alice's message", |e| match &e.kind {
            EventKind::Message {
                from,
                text,
                id: mid,
                ..
            } if *mid == id => Some((from.clone(), text.clone())),
            _ => None,
        })
        .await;
    assert_eq!((from.as_str(), text.as_str()), ("alice", "hi bob"));
    let contacts = b.handle.contact_list().await.unwrap();
    assert_eq!(contacts.len(), 1);
    assert!(contacts[0].auto_added);
    // Both sides compute the same safety number.
    assert_eq!(contacts[0].safety_number, shown.safety_number);

    for state in ["sent", "delivered"] {
        a.wait_for(state, |e| match &e.kind {
            EventKind::Receipt {
                id: rid, state: s, ..
            } if *rid == id && s == state => Some(()),
            _ => None,
        })
        .await;
    }
    assert_eq!(b.handle.mark_read("alice").await.unwrap(), 1);
    a.wait_for("read", |e| match &e.kind {
        EventKind::Receipt { id: rid, state, .. } if *rid == id && state == "read" => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(b.handle.mark_read("alice").await.unwrap(), 0);

    // Bob answers over the session alice started.
    b.handle.send("alice", "hello alice").await.unwrap();
    let h = a.wait_history("bob", LONG, |h| h.len() == 2).await;
    assert_eq!(h[0].text, "hi bob");
    assert_eq!(h[0].from, "me");
    assert_eq!(h[0].state, "read");
    assert_eq!(h[1].text, "hello alice");
    assert_eq!(h[1].from, "bob");
    let convs = a.handle.conversations().await.unwrap();
    assert_eq!(convs[0].name, "bob");
    assert_eq!(convs[0].unread, 1);
    a.stop().await;
    b.stop().await;
}

// On the runtime the daemon uses, where a node idle between sends flushes on the actor's
// thread and one with deliveries running flushes on the blocking pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_arrive_once_in_order_and_are_delivered() {
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    let n = 1000;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            a.handle
                .send("bob", &format!("message {i}"))
                .await
                .unwrap()
                .to_hex(),
        );
    }
    let got = b.wait_history("alice", LONG, |h| h.len() >= n).await;
    assert_eq!(got.len(), n, "each message exactly once");
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.text, format!("message {i}"), "in order");
        assert_eq!(m.id, ids[i]);
    }
    a.wait_history("bob", LONG, |h| all(h, n, "delivered"))
        .await;
    eventually("outbox drained", LONG, || async {
        (a.handle.status().await.unwrap().outbox == 0).then_some(())
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn both_directions_at_once_with_simultaneous_session_starts() {
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn("bob").await;
    // Both add each other by ticket, so both start a session at the same time.
    a.add_contact(&b, "bob").await;
    b.add_contact(&a, "alice").await;
    let n = 200;
    let (ra, rb) = tokio::join!(
        async {
            for i in 0..n {
                a.handle.send("bob", &format!("a{i}")).await.unwrap();
            }
        },
        async {
            for i in 0..n {
                b.handle.send("alice", &format!("b{i}")).await.unwrap();
            }
        }
    );
    let _ = (ra, rb);
    let at_b = b
        .wait_history("alice", LONG, |h| {
            h.iter().filter(|m| m.from == "alice").count() == n
        })
        .await;
    let at_a = a
        .wait_history("bob", LONG, |h| {
            h.iter().filter(|m| m.from == "bob").count() == n
        })
        .await;
    let inbound: Vec<&str> = at_b
        .iter()
        .filter(|m| m.from == "alice")
        .map(|m| m.text.as_str())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
    assert_eq!(
        inbound,
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(at_a.iter().filter(|m| m.from == "bob").count(), n);
    a.wait_history("bob", LONG, |h| {
        h.iter()
            .filter(|m| m.from == "me")
            .all(|m| m.state == "delivered")
    })
    .await;
    b.wait_history("alice", LONG, |h| {
        h.iter()
            .filter(|m| m.from == "me")
            .all(|m| m.state == "delivered")
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn three_nodes_talk_pairwise() {
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn("bob").await;
    let c = TestNode::spawn("carol").await;
    a.add_contact(&b, "bob").await;
    a.add_contact(&c, "carol").await;
    c.add_contact(&b, "bob").await;
    a.handle.send("bob", "a->b").await.unwrap();
    a.handle.send("carol", "a->c").await.unwrap();
    c.handle.send("bob", "c->b").await.unwrap();
    b.wait_history("alice", LONG, |h| h.len() == 1 && h[0].text == "a->b")
        .await;
    b.wait_history("carol", LONG, |h| h.len() == 1 && h[0].text == "c->b")
        .await;
    c.wait_history("alice", LONG, |h| h.len() == 1 && h[0].text == "a->c")
        .await;
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn offline_recipient_gets_queued_messages_when_back() {
    let a = TestNode::spawn("alice").await;
    let mut b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    a.handle.send("bob", "before").await.unwrap();
    b.wait_history("alice", LONG, |h| h.len() == 1).await;
    a.wait_history("bob", LONG, |h| all(h, 1, "delivered"))
        .await;

    b.stop_keep().await;
    let id = a.handle.send("bob", "while you were away").await.unwrap();
    // It stays queued while bob is away.
    let h = a.wait_history("bob", LONG, |h| h.len() == 2).await;
    assert_eq!(h[1].state, "queued");
    assert!(a.handle.status().await.unwrap().outbox >= 1);

    // Bob comes back on a new port; his node reconnects to alice, and the queue flows.
    b.start_again().await;
    let got = b.wait_history("alice", LONG, |h| h.len() == 2).await;
    assert_eq!(got[1].text, "while you were away");
    assert_eq!(got[1].id, id.to_hex());
    a.wait_history("bob", LONG, |h| all(h, 2, "delivered"))
        .await;
    a.stop().await;
    b.stop().await;
}

/// Messages that cannot be delivered before their expiry fail, each with a `messageFailed`
/// event, and leave the outbox, also past the first delivery round (about 2 MiB: 32 texts
/// of 64 KiB) and when a whole round had expired.
#[tokio::test]
async fn messages_past_their_expiry_fail_with_an_event_even_beyond_one_round() {
    let mut a = TestNode::spawn_with("alice", |c| c.message_ttl_secs = 1).await;
    let b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    b.stop().await;
    let big = "x".repeat(60 * 1024);
    let mut ids = Vec::new();
    for i in 0..40 {
        let text = if i == 39 { "small" } else { big.as_str() };
        ids.push(a.handle.send("bob", text).await.unwrap().to_hex());
    }
    // All of them expire while alice is stopped: at her start, whole rounds have expired.
    a.stop_keep().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.start_again().await;
    let h = a.wait_history("bob", LONG, |h| all(h, 40, "failed")).await;
    assert!(
        h.iter()
            .all(|m| m.error.as_deref().is_some_and(|e| e.contains("expired")))
    );
    assert_eq!(a.handle.status().await.unwrap().outbox, 0);
    // One `messageFailed` event each, kept in the event log.
    let log = a.handle.subscribe(Some(0)).unwrap().backlog;
    let failed: std::collections::HashSet<String> = log
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::MessageFailed { id, reason, .. } if reason.contains("expired") => {
                Some(id.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), ids.len());
    assert!(ids.iter().all(|id| failed.contains(id)));
    a.stop().await;
}

/// Once a session's chain positions are reserved durably, the next messages on that chain
/// leave before their own flush; all of them still arrive once and in order, across a
/// clean restart of the sender (which reserves again) and a restart of the recipient.
#[tokio::test]
async fn messages_covered_by_a_reservation_leave_before_their_flush_and_arrive_in_order() {
    let mut a = TestNode::spawn("alice").await;
    let mut b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    // The first message starts the session (and its chain): it waits for its flush.
    a.handle.send("bob", "m0").await.unwrap();
    a.wait_history("bob", LONG, |h| all(h, 1, "delivered"))
        .await;
    let before = a.handle.status().await.unwrap().sent_before_flush;
    for i in 1..=5 {
        a.handle.send("bob", &format!("m{i}")).await.unwrap();
        a.wait_history("bob", LONG, |h| all(h, i + 1, "delivered"))
            .await;
    }
    let early = a.handle.status().await.unwrap().sent_before_flush - before;
    assert!(early >= 5, "only {early} of 5 left before their flush");
    // A clean restart clears the reservations; the chain goes on where it was.
    a.restart().await;
    a.wait_connected(&b.handle.peer_id()).await;
    for i in 6..=8 {
        a.handle.send("bob", &format!("m{i}")).await.unwrap();
    }
    a.wait_history("bob", LONG, |h| all(h, 9, "delivered"))
        .await;
    b.restart().await;
    a.handle.send("bob", "m9").await.unwrap();
    let got = b.wait_history("alice", LONG, |h| h.len() == 10).await;
    let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "m9"]
    );
    a.wait_history("bob", LONG, |h| all(h, 10, "delivered"))
        .await;
    a.stop().await;
    b.stop().await;
}

/// A backlog longer than the ratchet's skip window (`MAX_SKIP`, 1,000 messages) flows at
/// full speed when the recipient returns: requests overtaking each other on the way must
/// not lose the messages they passed (`TooEarly` is retried; the sender keeps its
/// envelopes in flight within the window).
#[tokio::test]
async fn a_backlog_longer_than_the_skip_window_arrives_whole_and_in_order() {
    let a = TestNode::spawn("alice").await;
    let mut b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    a.handle.send("bob", "hello").await.unwrap();
    a.wait_history("bob", LONG, |h| all(h, 1, "delivered"))
        .await;
    b.stop_keep().await;
    let n = 2_200;
    let text = |i: usize| format!("{i:05} {}", "k".repeat(1024));
    let senders = 16;
    let mut tasks = Vec::new();
    for s in 0..senders {
        let handle = a.handle.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (s..n).step_by(senders) {
                ids.push((i, handle.send("bob", &text(i)).await.unwrap()));
            }
            ids
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(a.handle.status().await.unwrap().outbox >= n as u64);

    b.start_again().await;
    let h = a
        .wait_history("bob", Duration::from_secs(240), |h| {
            h.len() == n + 1
                && h.iter()
                    .all(|m| m.state == "delivered" || m.state == "failed")
        })
        .await;
    let failed = h.iter().filter(|m| m.state == "failed").count();
    assert_eq!(failed, 0, "{failed} of {n} messages failed");
    let got = b.wait_history("alice", LONG, |h| h.len() > n).await;
    assert_eq!(got.len(), n + 1, "each message exactly once");
    let ids = |h: &[tern_node::messaging::HistoryItem]| -> Vec<String> {
        h.iter().map(|m| m.id.clone()).collect()
    };
    assert_eq!(ids(&got), ids(&h), "the same messages in the same order");
    let texts: std::collections::HashSet<String> = (0..n).map(text).collect();
    assert!(got[1..].iter().all(|m| texts.contains(&m.text)));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn typing_reaches_a_connected_contact_and_is_never_stored() {
    // Alice shares no presence, so nothing but the first message starts a session (sharing
    // would send bob her presence key, over a new session, whenever her node gets to it).
    let a = TestNode::spawn_with("alice", |c| {
        c.presence.share = tern_node::config::SharePresence::Nobody;
    })
    .await;
    let mut b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    // No session yet: typing starts none.
    assert!(!a.handle.typing("bob", true).await.unwrap());
    a.handle.send("bob", "hi").await.unwrap();
    a.wait_history("bob", LONG, |h| all(h, 1, "delivered"))
        .await;
    assert!(a.handle.typing("bob", true).await.unwrap());
    let typing = b
        .wait_for("typing", |e| match &e.kind {
            EventKind::Typing { from, typing, .. } if from == "alice" => Some(*typing),
            _ => None,
        })
        .await;
    assert!(typing);
    assert_eq!(
        b.handle.history("alice", 100).await.unwrap().len(),
        1,
        "typing is not a message"
    );
    // Messages still decrypt after the typing envelope advanced the ratchet.
    a.handle.send("bob", "after typing").await.unwrap();
    b.wait_history("alice", LONG, |h| h.len() == 2).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn bad_sends_are_refused_and_nothing_is_queued() {
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    // Adding a contact queues our profile and presence key for it; none of the bad sends
    // below may add to that.
    let queued = a.handle.status().await.unwrap().outbox;
    let e = a.handle.send("nobody", "hi").await.unwrap_err().to_string();
    assert!(e.contains("unknown contact"), "{e}");
    let e = a
        .handle
        .send("bob", &"x".repeat(MAX_TEXT_BYTES + 1))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("too large"), "{e}");
    assert!(a.handle.send("bob", "").await.is_err());
    assert!(a.handle.status().await.unwrap().outbox <= queued);
    assert!(a.handle.history("bob", 10).await.unwrap().is_empty());
    // Exactly the limit is fine and arrives.
    a.handle
        .send("bob", &"y".repeat(MAX_TEXT_BYTES))
        .await
        .unwrap();
    let h = b.wait_history("alice", LONG, |h| h.len() == 1).await;
    assert_eq!(h[0].text.len(), MAX_TEXT_BYTES);

    // Bad tickets and names.
    assert!(a.handle.contact_add("tern1garbage", "x").await.is_err());
    let ticket = b.handle.ticket().await.unwrap().encode();
    let e = a
        .handle
        .contact_add(&ticket, "bobby")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already your contact"), "{e}");
    let own = a.handle.ticket().await.unwrap().encode();
    assert!(a.handle.contact_add(&own, "me").await.is_err());
    // A third node: "me" stands for ourselves, and a name that differs from a contact's
    // only in letter case reads as that contact; both are refused.
    let c = TestNode::spawn("carol").await;
    let carol = c.handle.ticket().await.unwrap().encode();
    for (name, why) in [("Me", "reserved"), ("BOB", "already")] {
        let e = a
            .handle
            .contact_add(&carol, name)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{name}: {e}");
    }
    // Stored in one Unicode form: "José" typed with a combining accent finds her.
    let stored = a
        .handle
        .contact_add(&carol, "Jose\u{301}")
        .await
        .unwrap()
        .name;
    assert_eq!(stored, "Jos\u{e9}");
    a.handle.send("Jos\u{e9}", "hola").await.unwrap();
    a.handle.send("Jose\u{301}", "hola").await.unwrap();
    assert_eq!(a.handle.history("Jose\u{301}", 10).await.unwrap().len(), 2);
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

/// A `Deliver` request of an envelope from `from` to `to` (their identities from their
/// peer ids), as any peer can make one.
fn deliver(
    id: wire::MsgId,
    from: &tern_node::PeerId,
    to: &tern_node::PeerId,
    ciphertext: Vec<u8>,
) -> wire::Request {
    let key = |p: &tern_node::PeerId| {
        tern_node::identity::ed25519_public_of(p)
            .unwrap()
            .to_bytes()
    };
    wire::Request::Deliver(wire::Envelope {
        id,
        sender: key(from),
        recipient: key(to),
        ciphertext,
    })
}

/// A message id of `ms` (as a sender makes them) ending in `tag`s.
fn id_at(ms: u64, tag: u8) -> wire::MsgId {
    let mut id = [tag; 16];
    id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    wire::MsgId(id)
}

#[tokio::test]
async fn garbage_and_forged_envelopes_are_rejected_and_the_node_keeps_serving() {
    let start = tern_node::events::now_ms();
    let id_now = |tag| id_at(start, tag);
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn("bob").await;
    let c = TestNode::spawn("carol").await;
    a.add_contact(&b, "bob").await;
    c.add_contact(&b, "bob").await;
    let b_id = b.handle.peer_id();
    let b_addr = b.tcp_addr().await;
    a.handle.dial(b_addr).await.unwrap();

    let ask = |bytes: Vec<u8>| {
        let net = a.handle.net().clone();
        async move { net.request(b_id, Vec::new(), bytes).await }
    };
    // Garbage.
    let r = Response::from_bytes(&ask(b"\x01garbage".to_vec()).await.unwrap()).unwrap();
    assert!(
        matches!(r, Response::Rejected(_, RejectReason::Malformed)),
        "{r:?}"
    );
    let r = Response::from_bytes(&ask(vec![]).await.unwrap()).unwrap();
    assert!(
        matches!(r, Response::Rejected(_, RejectReason::Malformed)),
        "{r:?}"
    );
    // Oversize frames never reach the messaging code: the stream fails.
    assert!(ask(vec![0u8; wire::MAX_REQUEST_FRAME + 1]).await.is_err());
    // An envelope claiming to come from carol over alice's connection.
    let forged = deliver(id_now(9), &c.handle.peer_id(), &b_id, vec![1, 2, 3]);
    let r = Response::from_bytes(&ask(forged.clone().to_bytes()).await.unwrap()).unwrap();
    assert!(
        matches!(r, Response::Rejected(_, RejectReason::WrongParty)),
        "{r:?}"
    );
    // Alice's own identity but a ciphertext that does not decrypt.
    let bogus = deliver(id_now(8), &a.handle.peer_id(), &b_id, vec![0x01; 200]);
    let r = Response::from_bytes(&ask(bogus.clone().to_bytes()).await.unwrap()).unwrap();
    assert!(
        matches!(
            r,
            Response::Rejected(_, RejectReason::Malformed | RejectReason::Undecryptable)
        ),
        "{r:?}"
    );

    // Batches: each envelope answered on its own, in order; empty or oversize ones refused.
    let mut forged_batch = Vec::new();
    for (i, env) in [forged, bogus].into_iter().enumerate() {
        let wire::Request::Deliver(mut e) = env else {
            unreachable!()
        };
        e.id = id_now(20 + i as u8);
        forged_batch.push(e);
    }
    let r = Response::from_bytes(
        &ask(wire::Request::DeliverBatch(forged_batch.clone()).to_bytes())
            .await
            .unwrap(),
    )
    .unwrap();
    match r {
        Response::Batch(answers) => {
            assert_eq!(answers.len(), 2, "{answers:?}");
            assert_eq!(
                answers[0],
                wire::Answer::Rejected(id_now(20), RejectReason::WrongParty)
            );
            assert!(
                matches!(
                    answers[1],
                    wire::Answer::Rejected(id, RejectReason::Malformed | RejectReason::Undecryptable)
                        if id == id_now(21)
                ),
                "{answers:?}"
            );
        }
        other => panic!("not a batch answer: {other:?}"),
    }
    // The same batch asking for a receipt: the same answers, and no receipt (nothing was
    // stored).
    let r = Response::from_bytes(
        &ask(wire::Request::DeliverReceipted(forged_batch.clone()).to_bytes())
            .await
            .unwrap(),
    )
    .unwrap();
    match r {
        Response::Receipted(answers, receipt) => {
            assert_eq!(answers.len(), 2, "{answers:?}");
            assert_eq!(
                answers[0],
                wire::Answer::Rejected(id_now(20), RejectReason::WrongParty)
            );
            assert!(receipt.is_none(), "{receipt:?}");
        }
        other => panic!("not a receipted answer: {other:?}"),
    }
    for batch in [
        Vec::new(),
        std::iter::repeat_n(forged_batch[0].clone(), wire::MAX_BATCH_ENVELOPES + 1).collect(),
    ] {
        for request in [
            wire::Request::DeliverBatch(batch.clone()),
            wire::Request::DeliverReceipted(batch),
        ] {
            let r = Response::from_bytes(&ask(request.to_bytes()).await.unwrap()).unwrap();
            assert!(
                matches!(r, Response::Rejected(_, RejectReason::Malformed)),
                "{r:?}"
            );
        }
    }

    let status = b.handle.status().await.unwrap();
    assert!(
        status.rejected.get("malformed").copied().unwrap_or(0) >= 2,
        "{:?}",
        status.rejected
    );
    assert!(
        status.rejected.contains_key("wrong_party"),
        "{:?}",
        status.rejected
    );
    // Everyone is still served.
    a.handle.send("bob", "still there?").await.unwrap();
    c.handle.send("bob", "me too").await.unwrap();
    b.wait_history("alice", LONG, |h| h.len() == 1).await;
    b.wait_history("carol", LONG, |h| h.len() == 1).await;
    assert!(b.handle.contact_list().await.unwrap().len() == 2);

    // An envelope carrying the id of one of bob's own messages to alice is refused before
    // it is opened: taken, it would overwrite bob's entry in his history.
    let own = b.handle.send("alice", "bob's own").await.unwrap();
    let reused = deliver(own, &a.handle.peer_id(), &b_id, vec![0x01; 200]);
    let r = Response::from_bytes(&ask(reused.to_bytes()).await.unwrap()).unwrap();
    assert!(
        matches!(r, Response::Rejected(id, RejectReason::Malformed) if id == own),
        "{r:?}"
    );
    // An envelope whose id is 60 days old is refused as stale before it is opened (the
    // dedup markers that would catch a replay are kept 60 days), transiently: if the
    // recipient's clock is the one that is wrong, nothing is lost.
    let old_ms = tern_node::events::now_ms() - 60 * 24 * 3600 * 1000;
    let stale = deliver(
        id_at(old_ms, 7),
        &a.handle.peer_id(),
        &b_id,
        vec![0x01; 200],
    );
    let r = Response::from_bytes(&ask(stale.to_bytes()).await.unwrap()).unwrap();
    assert!(
        matches!(r, Response::Rejected(_, RejectReason::Unavailable)),
        "{r:?}"
    );
    // So is one dated 40 days ahead (its dedup marker would outlive every prune).
    let ahead_ms = tern_node::events::now_ms() + 40 * 24 * 3600 * 1000;
    let ahead = deliver(
        id_at(ahead_ms, 6),
        &a.handle.peer_id(),
        &b_id,
        vec![0x01; 200],
    );
    let ahead = ahead.to_bytes();
    let future = |s: &tern_node::NodeStatus| s.rejected.get("future").copied().unwrap_or(0);
    let before = future(&b.handle.status().await.unwrap());
    let r = Response::from_bytes(&ask(ahead).await.unwrap()).unwrap();
    assert!(
        matches!(r, Response::Rejected(_, RejectReason::Unavailable)),
        "{r:?}"
    );
    let status = b.handle.status().await.unwrap();
    assert_eq!(future(&status), before + 1, "{:?}", status.rejected);
    assert_eq!(
        status.rejected.get("stale"),
        Some(&1),
        "{:?}",
        status.rejected
    );
    assert_eq!(
        status.rejected.get("id_reused"),
        Some(&1),
        "{:?}",
        status.rejected
    );
    let h = b.handle.history("alice", 10).await.unwrap();
    assert!(
        h.iter()
            .any(|m| m.id == own.to_hex() && m.text == "bob's own")
    );
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn a_replayed_envelope_is_acknowledged_but_shown_once() {
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    a.handle.send("bob", "once").await.unwrap();
    b.wait_history("alice", LONG, |h| h.len() == 1).await;
    // A replay (or a retry whose acknowledgement was lost) carries an id bob already stored:
    // he acknowledges it again without decrypting or showing it twice.
    let b_id = b.handle.peer_id();
    let env = wire::Envelope {
        id: wire::MsgId::from_hex(&b.handle.history("alice", 1).await.unwrap()[0].id).unwrap(),
        sender: tern_node::identity::ed25519_public_of(&a.handle.peer_id())
            .unwrap()
            .to_bytes(),
        recipient: tern_node::identity::ed25519_public_of(&b_id)
            .unwrap()
            .to_bytes(),
        ciphertext: vec![0xde; 64],
    };
    let bytes = wire::Request::Deliver(env.clone()).to_bytes();
    let r = Response::from_bytes(
        &a.handle
            .net()
            .request(b_id, Vec::new(), bytes)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        r,
        Response::Stored(env.id),
        "a known id is acknowledged again, not reprocessed"
    );
    assert_eq!(b.handle.history("alice", 10).await.unwrap().len(), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_flooding_peer_is_rate_limited_and_still_delivers_in_the_end() {
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn_with("bob", |c| {
        c.inbound_burst = 10;
        c.inbound_rate = 50;
    })
    .await;
    a.add_contact(&b, "bob").await;
    let n = 60;
    for i in 0..n {
        a.handle.send("bob", &format!("m{i}")).await.unwrap();
    }
    let got = b.wait_history("alice", LONG, |h| h.len() == n).await;
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, m)| m.text == format!("m{i}"))
    );
    let rejected = b.handle.status().await.unwrap().rejected;
    assert!(
        rejected.get("rate_limited").copied().unwrap_or(0) > 0,
        "{rejected:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn blocked_contacts_get_nothing_through_until_unblocked() {
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    b.add_contact(&a, "alice").await;
    // Nothing else of alice's (profile, presence key) is still on its way to bob.
    eventually("alice's outbox drained", LONG, || async {
        (a.handle.status().await.unwrap().outbox == 0).then_some(())
    })
    .await;
    b.handle.contact_block("alice", true).await.unwrap();
    a.handle.send("bob", "let me in").await.unwrap();
    // Alice tries to deliver it and bob drops it unanswered: he never stores it, and
    // alice keeps it queued.
    eventually("bob refuses alice's delivery", LONG, || async {
        let rejected = b.handle.status().await.unwrap().rejected;
        (rejected.get("blocked").copied().unwrap_or(0) > 0).then_some(())
    })
    .await;
    assert!(b.handle.history("alice", 10).await.unwrap().is_empty());
    let h = a.handle.history("bob", 10).await.unwrap();
    assert!(h.len() == 1 && h[0].state == "queued", "{h:?}");
    let e = b.handle.send("alice", "hi").await.unwrap_err().to_string();
    assert!(e.contains("blocked"), "{e}");
    b.handle.contact_block("alice", false).await.unwrap();
    b.handle.send("alice", "sorry").await.unwrap();
    b.wait_history("alice", LONG, |h| h.iter().any(|m| m.text == "let me in"))
        .await;
    a.stop().await;
    b.stop().await;
}

/// Alice and bob, contacts of each other, after one message each way: each holds a
/// session the other accepted, and bob's message is delivered.
async fn talking_pair() -> (TestNode, TestNode) {
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    b.add_contact(&a, "alice").await;
    a.handle.send("bob", "hi bob").await.unwrap();
    b.wait_history("alice", LONG, |h| h.len() == 1).await;
    b.handle.send("alice", "hi alice").await.unwrap();
    b.wait_history("alice", LONG, |h| h.len() == 2 && h[1].state == "delivered")
        .await;
    (a, b)
}

/// A contact that removed us lost our session: our next messages are refused as
/// undecryptable, so our node starts a new session by itself and sends them again under
/// their ids. They arrive once, in order, as a message request, and reach `delivered`.
#[tokio::test]
async fn a_contact_that_removed_us_gets_our_next_messages_in_a_new_session() {
    // Both have sent and received: alice's session is one bob accepted.
    let (a, mut b) = talking_pair().await;
    b.handle.contact_remove("alice").await.unwrap();
    let mut ids = Vec::new();
    for text in ["still there?", "it's me"] {
        ids.push(a.handle.send("bob", text).await.unwrap().to_hex());
    }
    let h = a
        .wait_history("bob", LONG, |h| {
            h.len() == 4 && h[2..].iter().all(|m| m.state == "delivered")
        })
        .await;
    assert_eq!(h[2].id, ids[0]);
    // The new session's profile went first: the texts come from "alice", not "peer-…".
    let from = b
        .wait_for("the first text again", |e| match &e.kind {
            EventKind::Message { id, from, .. } if *id == ids[0] => Some(from.clone()),
            _ => None,
        })
        .await;
    assert_eq!(from, "alice");
    let contacts = b.handle.contact_list().await.unwrap();
    assert_eq!(contacts.len(), 1);
    assert!(contacts[0].auto_added, "a message request");
    assert_eq!(contacts[0].name, "alice");
    // (Removing a contact keeps the history.)
    let got = b
        .wait_history(&contacts[0].name, LONG, |h| h.len() == 4)
        .await;
    let texts: Vec<_> = got[2..]
        .iter()
        .map(|m| (m.id.as_str(), m.text.as_str()))
        .collect();
    assert_eq!(
        texts,
        vec![
            (ids[0].as_str(), "still there?"),
            (ids[1].as_str(), "it's me")
        ],
        "once each, in order, under the ids alice was given"
    );
    // Nothing failed on the way, and the new session works both ways.
    assert!(
        a.handle
            .history("bob", 10)
            .await
            .unwrap()
            .iter()
            .all(|m| m.state != "failed")
    );
    b.handle
        .send(&contacts[0].name, "back again")
        .await
        .unwrap();
    a.wait_history("bob", LONG, |h| h.len() == 5).await;
    a.stop().await;
    b.stop().await;
}

/// A message request removed before it was answered: the sender's session was never
/// confirmed, so its next message still starts a session (no restart, no profile first).
/// The new message request is named as the removed one was, not `peer-…`.
#[tokio::test]
async fn a_removed_message_request_that_writes_again_keeps_its_name() {
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    a.handle.send("bob", "first").await.unwrap();
    b.wait_history("alice", LONG, |h| h.len() == 1).await;
    b.handle.contact_remove("alice").await.unwrap();
    a.handle.send("bob", "second").await.unwrap();
    let contacts = eventually("a new message request", LONG, || async {
        let contacts = b.handle.contact_list().await.unwrap();
        (!contacts.is_empty()).then_some(contacts)
    })
    .await;
    assert_eq!(contacts.len(), 1);
    assert!(contacts[0].auto_added);
    assert_eq!(contacts[0].name, "alice");
    assert_eq!(contacts[0].announced_name.as_deref(), Some("alice"));
    b.wait_history("alice", LONG, |h| h.len() == 2 && h[1].text == "second")
        .await;
    a.stop().await;
    b.stop().await;
}

/// A contact set up again from its identity alone (its prekeys are new) cannot decrypt our
/// session, nor a new one started from its old ticket: the message fails after one restart
/// (no loop), with a reason that says what to do; a new ticket makes it work again.
#[tokio::test]
async fn a_contact_set_up_again_fails_our_message_after_one_restart() {
    let (mut a, mut b) = talking_pair().await;
    // Bob keeps his identity and loses everything else.
    b.stop_keep().await;
    let root = b.data_dir().root().to_path_buf();
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n != "identity.key") {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
    b.start_again().await;
    a.handle.dial(b.tcp_addr().await).await.unwrap();
    let id = a
        .handle
        .send("bob", "are you there?")
        .await
        .unwrap()
        .to_hex();
    let reason = a
        .wait_for("the message failed", |e| match &e.kind {
            EventKind::MessageFailed {
                id: fid, reason, ..
            } if *fid == id => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.contains("new ticket"), "{reason}");
    // Nothing is left to try (no loop): alice's outbox is empty, bob refuses nothing more
    // (the text under the old session, then the new session's profile and the text).
    eventually("alice's outbox empty", LONG, || async {
        (a.handle.status().await.unwrap().outbox == 0).then_some(())
    })
    .await;
    let refused = || async {
        let status = b.handle.status().await.unwrap();
        status.rejected.get("undecryptable").copied().unwrap_or(0)
    };
    let before = refused().await;
    assert!(before >= 2, "{before}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(refused().await, before);
    assert!(b.handle.contact_list().await.unwrap().is_empty());
    // With bob's new ticket, it works again.
    a.handle.contact_remove("bob").await.unwrap();
    a.add_contact(&b, "bob").await;
    a.handle.send("bob", "here I am").await.unwrap();
    a.wait_history("bob", LONG, |h| {
        h.last()
            .is_some_and(|m| m.text == "here I am" && m.state == "delivered")
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// Opens a stopped node's messaging tables.
fn open_db(n: &TestNode) -> (Store, MessagingDb) {
    let store = Store::open(&n.data_dir().db_path()).unwrap();
    let db = MessagingDb::open(&store).unwrap();
    (store, db)
}

/// The contact named `name` in `db`.
fn contact_named(db: &MessagingDb, name: &str) -> Contact {
    let list = db.contact_list().unwrap();
    list.into_iter().find(|c| c.name == name).unwrap()
}

/// Blocking a contact owes a rotation of the keys it held (our presence key and mailbox
/// token), written with the block in one transaction. A rotation stopped part-way (a full
/// disk, a crash) runs again, at the latest at the next start: here the record is left as
/// such a stop leaves it, and the start replaces the key for the other contacts only.
#[tokio::test]
async fn a_key_rotation_owed_for_a_blocked_contact_runs_at_the_next_start() {
    let mut a = TestNode::spawn("alice").await;
    let b = TestNode::spawn("bob").await;
    let c = TestNode::spawn("carol").await;
    a.add_contact(&b, "bob").await;
    a.add_contact(&c, "carol").await;
    // Bob holds alice's presence key once her first envelopes arrived.
    a.handle.send("bob", "hi").await.unwrap();
    a.wait_history("bob", LONG, |h| all(h, 1, "delivered"))
        .await;
    eventually("alice's outbox empty", LONG, || async {
        (a.handle.status().await.unwrap().outbox == 0).then_some(())
    })
    .await;
    a.stop_keep().await;
    let (store, db) = open_db(&a);
    let old_key = db.presence_self.get(b"self").unwrap().unwrap().key;
    let mut carol = contact_named(&db, "carol");
    carol.blocked = true;
    db.contacts.insert(&carol.key(), &carol).unwrap();
    db.rekey_owed.insert(&carol.key(), &true).unwrap();
    store.close_blocking().unwrap();
    drop((store, db));

    a.start_again().await;
    a.handle.dial(b.tcp_addr().await).await.unwrap();
    // The new key is queued at the start, and delivered to bob (not to blocked carol).
    eventually("the new key delivered", LONG, || async {
        let status = a.handle.status().await.unwrap();
        (status.outbox == 0).then_some(())
    })
    .await;
    a.stop_keep().await;
    b.stop_keep().await;
    let (store, db) = open_db(&a);
    let new_key = db.presence_self.get(b"self").unwrap().unwrap().key;
    assert_ne!(new_key, old_key, "rotated");
    assert!(
        db.rekey_owed.scan_prefix(&[]).unwrap().is_empty(),
        "no longer owed"
    );
    let alice = contact_named(&open_db(&b).1, "alice");
    drop((store, db));
    let (_bstore, bdb) = open_db(&b);
    let held = bdb.presence_keys.get(&alice.key()).unwrap();
    assert_eq!(held, Some(new_key), "bob holds the new key");
    c.stop().await;
}

/// A blocked contact the user removes stays blocked: its node, no longer decrypted,
/// starts a new session (a message request) that is dropped like any envelope from a
/// blocked peer. Added again by ticket, it comes back blocked; unblocked, its queue flows.
#[tokio::test]
async fn a_removed_blocked_contact_stays_blocked() {
    let (a, b) = talking_pair().await;
    b.handle.contact_block("alice", true).await.unwrap();
    b.handle.contact_remove("alice").await.unwrap();
    a.handle.send("bob", "let me in").await.unwrap();
    eventually("bob drops alice's envelopes", LONG, || async {
        let rejected = b.handle.status().await.unwrap().rejected;
        (rejected.get("blocked").copied().unwrap_or(0) > 0).then_some(())
    })
    .await;
    assert!(
        b.handle.contact_list().await.unwrap().is_empty(),
        "no message request"
    );
    // Added again, she is blocked; unblocked, her message arrives.
    b.add_contact(&a, "alice").await;
    assert!(b.handle.contact_show("alice").await.unwrap().blocked);
    b.handle.contact_block("alice", false).await.unwrap();
    b.wait_history("alice", LONG, |h| h.iter().any(|m| m.text == "let me in"))
        .await;
    a.stop().await;
    b.stop().await;
}

/// The blocked contacts a user removed are listed, and unblocked by peer id: the peer's
/// next message comes in as a message request, named as it had announced itself.
#[tokio::test]
async fn a_removed_blocked_contact_is_listed_and_unblocked_by_peer_id() {
    use tern_node::{NodeError, messaging::MessagingError as M};
    let (a, b) = talking_pair().await;
    let alice = a.handle.peer_id();
    b.handle.contact_block("alice", true).await.unwrap();
    let listed = |name: &str, contact| BlockedPeer {
        peer_id: alice.to_string(),
        name: Some(name.to_string()),
        contact,
    };
    assert_eq!(
        b.handle.blocked_list().await.unwrap(),
        vec![listed("alice", true)]
    );
    // A contact is unblocked by name.
    assert!(matches!(
        b.handle.peer_unblock(alice).await,
        Err(NodeError::Messaging(M::StillContact(_)))
    ));
    b.handle.contact_remove("alice").await.unwrap();
    assert_eq!(
        b.handle.blocked_list().await.unwrap(),
        vec![listed("alice", false)]
    );
    // The removed contact's history is kept, and read by its peer id.
    let kept = b.handle.history(&alice.to_string(), 10).await.unwrap();
    let texts: Vec<&str> = kept.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["hi bob", "hi alice"]);
    assert!(b.handle.history("12D3KooWnobody", 10).await.is_err());
    a.handle.send("bob", "let me in").await.unwrap();
    eventually("bob drops alice's envelopes", LONG, || async {
        let rejected = b.handle.status().await.unwrap().rejected;
        (rejected.get("blocked").copied().unwrap_or(0) > 0).then_some(())
    })
    .await;
    b.handle.peer_unblock(alice).await.unwrap();
    assert!(b.handle.blocked_list().await.unwrap().is_empty());
    assert!(matches!(
        b.handle.peer_unblock(alice).await,
        Err(NodeError::Messaging(M::NotBlocked(_)))
    ));
    let h = b
        .wait_history("alice", LONG, |h| h.iter().any(|m| m.text == "let me in"))
        .await;
    assert_eq!(h.iter().filter(|m| m.text == "let me in").count(), 1);
    let c = b.handle.contact_show("alice").await.unwrap();
    assert!(c.auto_added && !c.blocked, "a message request");
    a.stop().await;
    b.stop().await;
}

/// Strangers can start at most `max_message_requests` conversations at once: beyond that
/// they are refused (`RateLimited`, so they retry), until the user handles a request.
#[tokio::test]
async fn message_requests_beyond_the_budget_wait_until_one_is_handled() {
    let b = TestNode::spawn_with("bob", |c| c.max_message_requests = 1).await;
    let a = TestNode::spawn("alice").await;
    let c = TestNode::spawn("carol").await;
    // Both know bob; bob knows neither.
    a.add_contact(&b, "bob").await;
    c.add_contact(&b, "bob").await;
    let b_addr = b.tcp_addr().await;
    a.handle.dial(b_addr.clone()).await.unwrap();
    c.handle.dial(b_addr).await.unwrap();
    a.handle.send("bob", "hi from alice").await.unwrap();
    c.handle.send("bob", "hi from carol").await.unwrap();
    // One of them becomes a message request, the other is refused for now.
    let first = eventually("one message request and one refusal", LONG, || async {
        let contacts = b.handle.contact_list().await.unwrap();
        let refused = b
            .handle
            .status()
            .await
            .unwrap()
            .rejected
            .get("requests_full")
            .copied()
            .unwrap_or(0);
        (contacts.len() == 1 && refused > 0).then(|| contacts[0].name.clone())
    })
    .await;
    assert_eq!(b.handle.contact_list().await.unwrap().len(), 1);
    // Bob removes that request: the other stranger's retry gets through.
    b.handle.contact_remove(&first).await.unwrap();
    let second = eventually("the other message request", LONG, || async {
        let contacts = b.handle.contact_list().await.unwrap();
        (contacts.len() == 1 && contacts[0].name != first).then(|| contacts[0].name.clone())
    })
    .await;
    b.wait_history(&second, LONG, |h| h.len() == 1).await;
    a.stop().await;
    c.stop().await;
    b.stop().await;
}
