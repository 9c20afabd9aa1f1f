//! Presence between in-process nodes on loopback: online within a heartbeat, away, offline
//! at once on a graceful stop, last seen across restarts, `share = "nobody"` checked on the
//! wire, and forged, replayed, flooding and garbage frames rejected and penalised.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::{Duration, Instant};

use rand::RngCore;
use tern_node::{
    Identity,
    config::SharePresence,
    events::EventKind,
    presence::{
        PresenceView,
        wire::{self, Body, PresenceKey, State},
    },
};
use tern_tests::{TestNode, eventually};

const HEARTBEAT_MS: u64 = 1_000;
const MISSED_BEATS: u32 = 3;

/// A heartbeat so slow that within [`EXPLICIT_WITHIN`] neither bob's next beat nor the
/// timeout (alice's [`MISSED_BEATS`] of bob's beats, six minutes) can happen: what alice
/// sees that soon after bob stops or starts comes from the frame he sends on purpose.
const SLOW_HEARTBEAT_MS: u64 = 120_000;
/// How soon alice must see the frames bob sends when he stops and when he starts (generous
/// for a slow machine, far below [`SLOW_HEARTBEAT_MS`]).
const EXPLICIT_WITHIN: Duration = Duration::from_secs(60);

async fn node(name: &str, share: SharePresence) -> TestNode {
    node_beating(name, share, HEARTBEAT_MS).await
}

async fn node_beating(name: &str, share: SharePresence, heartbeat_ms: u64) -> TestNode {
    TestNode::spawn_with(name, |c| {
        c.presence.heartbeat_ms = heartbeat_ms;
        c.presence.missed_beats = MISSED_BEATS;
        c.presence.share = share;
    })
    .await
}

/// Two nodes that added each other (so each holds the other's presence key).
async fn pair(share_b: SharePresence) -> (TestNode, TestNode) {
    pair_beating(share_b, HEARTBEAT_MS).await
}

/// [`pair`] with bob beating every `bob_heartbeat_ms`.
async fn pair_beating(share_b: SharePresence, bob_heartbeat_ms: u64) -> (TestNode, TestNode) {
    let a = node("alice", SharePresence::Contacts).await;
    let b = node_beating("bob", share_b, bob_heartbeat_ms).await;
    a.add_contact(&b, "bob").await;
    b.add_contact(&a, "alice").await;
    (a, b)
}

async fn presence(n: &TestNode, name: &str) -> PresenceView {
    n.handle.presence(Some(name)).await.unwrap().remove(0)
}

async fn wait_state(n: &mut TestNode, who: &str, want: &str) -> (Instant, Option<u64>) {
    let label = format!("{who} {want}");
    n.wait_for(&label, |e| match &e.kind {
        EventKind::PresenceChanged {
            name,
            state,
            last_seen,
            ..
        } if name == who && state == want => Some((Instant::now(), *last_seen)),
        _ => None,
    })
    .await
}

/// Bob beats only every [`SLOW_HEARTBEAT_MS`], so every change alice sees in time comes
/// from a frame bob sends at once: on a state change, to a new follower, at his start, and
/// the `offline` of his graceful stop.
#[tokio::test]
async fn online_within_a_heartbeat_away_offline_at_once_and_last_seen_survives() {
    let (mut a, mut b) = pair_beating(SharePresence::Contacts, SLOW_HEARTBEAT_MS).await;
    wait_state(&mut a, "bob", "online").await;
    assert_eq!(presence(&a, "bob").await.state, "online");
    let bob_topic = wire::topic_for(&b.handle.peer_id());
    let stats = a.handle.net().topic_stats(bob_topic.clone()).await.unwrap();
    assert!(stats.received > 0, "frames arrived over gossipsub");

    // Away, as chosen by bob.
    b.handle.set_presence("away").await.unwrap();
    wait_state(&mut a, "bob", "away").await;
    b.handle.set_presence("online").await.unwrap();
    wait_state(&mut a, "bob", "online").await;

    // A graceful stop says offline itself: long before the timeout (three of bob's slow
    // beats) could.
    let stopped = Instant::now();
    b.stop_keep().await;
    let (at, last_seen) = wait_state(&mut a, "bob", "offline").await;
    assert!(
        at - stopped < EXPLICIT_WITHIN,
        "offline only after {:?}: not from bob's offline frame",
        at - stopped
    );
    assert!(last_seen.is_some(), "a last seen time");

    // Bob starts again and says so at once, instead of waiting for his next beat.
    let started = Instant::now();
    b.start_again().await;
    let (at, _) = wait_state(&mut a, "bob", "online").await;
    assert!(
        at - started < EXPLICIT_WITHIN,
        "online only after {:?}: bob did not announce his start",
        at - started
    );

    // Last seen survives alice's restart.
    b.stop_keep().await;
    let (_, last_seen) = wait_state(&mut a, "bob", "offline").await;
    a.restart().await;
    let view = presence(&a, "bob").await;
    assert_eq!(view.state, "offline");
    assert_eq!(view.last_seen, last_seen);
    assert!(last_seen.is_some());
    a.stop().await;
}

#[tokio::test]
async fn nobody_publishes_nothing_on_the_wire_and_sees_no_one() {
    let (mut a, b) = pair(SharePresence::Nobody).await;
    // Alice shares with contacts; bob shares with nobody, and so sees no one either.
    let alice = a.handle.peer_id();
    let alice_topic = wire::topic_for(&alice);
    let bob_topic = wire::topic_for(&b.handle.peer_id());
    a.wait_connected(&b.handle.peer_id()).await;
    // Several heartbeats pass.
    tokio::time::sleep(Duration::from_millis(4 * HEARTBEAT_MS)).await;
    let sent = b.handle.net().topic_stats(bob_topic.clone()).await.unwrap();
    assert_eq!(sent.published, 0, "bob published presence");
    let heard = a.handle.net().topic_stats(bob_topic).await.unwrap();
    assert_eq!(
        heard.received, 0,
        "bob's presence reached alice over the wire"
    );
    assert_eq!(presence(&a, "bob").await.state, "unknown");
    // Bob joins no contact's topic, so alice's frames are not even delivered to him.
    let alice_heard_at_bob = b
        .handle
        .net()
        .topic_stats(alice_topic.clone())
        .await
        .unwrap();
    assert_eq!(alice_heard_at_bob.received, 0);
    let view = presence(&b, "alice").await;
    assert_eq!((view.state.as_str(), view.last_seen), ("unknown", None));
    assert_eq!(
        b.handle.status().await.unwrap().presence.own_state,
        "hidden"
    );

    // The control: gossip between them works, so the zeros above come from bob's choice and
    // not from a link that carries nothing. Bob's node joins alice's topic by hand (anyone
    // who knows her peer id can): her frames then reach it, and bob still shows nothing.
    b.handle
        .net()
        .subscribe(alice_topic.clone(), None)
        .await
        .unwrap();
    eventually(
        "alice's frames reach bob's node on her topic",
        Duration::from_secs(20),
        || {
            let net = b.handle.net().clone();
            let topic = alice_topic.clone();
            async move { (net.topic_stats(topic).await.unwrap().received > 0).then_some(()) }
        },
    )
    .await;
    let published = a.handle.net().topic_stats(alice_topic).await.unwrap();
    assert!(published.published > 0, "alice published on her topic");
    let view = presence(&b, "alice").await;
    assert_eq!(
        (view.state.as_str(), view.last_seen),
        ("unknown", None),
        "bob shows nothing of the frames his node received"
    );
    a.stop().await;
    b.stop().await;
}

/// Mallory is connected to alice and publishes on bob's topic.
#[tokio::test]
async fn forged_replayed_flooding_and_garbage_frames_are_rejected_and_penalised() {
    let (mut a, b) = pair(SharePresence::Contacts).await;
    wait_state(&mut a, "bob", "online").await;
    let bob = b.handle.peer_id();
    let bob_topic = wire::topic_for(&bob);
    let bob_identity = Identity::load(&b.data_dir()).unwrap();
    b.stop_keep().await;
    wait_state(&mut a, "bob", "offline").await;

    let m = node("mallory", SharePresence::Contacts).await;
    let mallory = m.handle.peer_id();
    m.handle.dial(a.tcp_addr().await).await.unwrap();
    // Mallory joins bob's topic (anyone who knows bob's peer id can).
    m.handle
        .net()
        .subscribe(bob_topic.clone(), None)
        .await
        .unwrap();
    eventually(
        "mallory sees alice on bob's topic",
        Duration::from_secs(20),
        || {
            let net = m.handle.net().clone();
            let topic = bob_topic.clone();
            let alice = a.handle.peer_id();
            async move {
                let peers = net.topic_peers(topic).await.unwrap();
                peers.contains(&alice).then_some(())
            }
        },
    )
    .await;
    let body = |state| Body {
        state,
        heartbeat_ms: HEARTBEAT_MS,
        sent_at_ms: tern_node::events::now_ms(),
    };
    let nonce = || {
        let mut n = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut n);
        n
    };
    let key = PresenceKey([0; 32]);
    let publish = |frame: Vec<u8>| {
        let net = m.handle.net().clone();
        let topic = bob_topic.clone();
        async move { net.publish(topic, frame).await.unwrap() }
    };
    let rejected = |reason: &'static str| {
        let h = a.handle.clone();
        async move {
            let s = h.status().await.unwrap();
            s.presence.rejected.get(reason).copied().unwrap_or(0)
        }
    };

    // 1. Forged: mallory signs a frame naming bob as its owner.
    let seq = tern_node::events::now_ms() + 1_000_000;
    publish(wire::seal(
        &Identity::load(&m.data_dir()).unwrap().signing_key(),
        &bob,
        &key,
        seq,
        &body(State::Online),
        nonce(),
    ))
    .await;
    eventually("forgery rejected", Duration::from_secs(10), || async {
        (rejected("bad_signature").await >= 1).then_some(())
    })
    .await;
    // 2. Mallory's own frame on bob's topic.
    let own = Identity::load(&m.data_dir()).unwrap();
    publish(wire::seal(
        &own.signing_key(),
        &mallory,
        &key,
        seq,
        &body(State::Online),
        nonce(),
    ))
    .await;
    eventually("wrong owner rejected", Duration::from_secs(10), || async {
        (rejected("wrong_owner").await >= 1).then_some(())
    })
    .await;
    // 3. Garbage.
    publish(vec![1, 2, 3, 4, 5]).await;
    eventually("garbage rejected", Duration::from_secs(10), || async {
        (rejected("malformed").await >= 1).then_some(())
    })
    .await;
    // 4. A replay: a genuine bob frame with an old sequence number (fresh bytes, so it is
    //    not a gossipsub duplicate).
    publish(wire::seal(
        &bob_identity.signing_key(),
        &bob,
        &key,
        1,
        &body(State::Online),
        nonce(),
    ))
    .await;
    eventually("replay rejected", Duration::from_secs(10), || async {
        (rejected("stale").await >= 1).then_some(())
    })
    .await;
    // None of it changed what alice shows.
    assert_eq!(presence(&a, "bob").await.state, "offline");
    // Mallory's score at alice went negative.
    let score = a.handle.net().gossip_score(mallory).await.unwrap().unwrap();
    assert!(score < 0.0, "mallory's score {score}");

    // 5. A flood of validly signed frames with fresh sequence numbers (as if bob's key
    //    were stolen, or bob misbehaved): beyond the burst they are rejected.
    let base = tern_node::events::now_ms() + 2_000_000;
    for i in 0..30 {
        publish(wire::seal(
            &bob_identity.signing_key(),
            &bob,
            &key,
            base + i,
            &body(State::Online),
            nonce(),
        ))
        .await;
    }
    eventually("flood rejected", Duration::from_secs(10), || async {
        (rejected("flood").await >= 1).then_some(())
    })
    .await;
    // Alice keeps serving: her API answers and her state is intact.
    assert_eq!(presence(&a, "bob").await.state, "offline");
    a.stop().await;
    m.stop().await;
}
