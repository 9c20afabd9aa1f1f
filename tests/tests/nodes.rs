//! In-process multi-node scenarios on loopback, through `NodeHandle`.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use tern_node::{ContactTicket, events::EventKind};
use tern_tests::TestNode;

#[tokio::test]
async fn three_nodes_connect_through_tickets_and_see_events() {
    let mut a = TestNode::spawn("alice").await;
    let mut b = TestNode::spawn("bob").await;
    let mut c = TestNode::spawn("carol").await;

    // Bob's ticket round-trips through text and is enough to reach him.
    let ticket = ContactTicket::decode(&b.handle.ticket().await.unwrap().encode()).unwrap();
    assert_eq!(ticket.peer_id, b.handle.peer_id());
    assert!(
        ticket
            .addrs
            .iter()
            .all(|a| a.to_string().starts_with("/ip4/127.0.0.1/"))
    );
    let addr = ticket.addrs[0]
        .clone()
        .with(tern_node::net::p2p(ticket.peer_id));
    assert_eq!(a.handle.dial(addr).await.unwrap(), b.handle.peer_id());
    let c_addr = c.tcp_addr().await;
    assert_eq!(b.handle.dial(c_addr).await.unwrap(), c.handle.peer_id());

    a.wait_connected(&b.handle.peer_id()).await;
    b.wait_connected(&a.handle.peer_id()).await;
    c.wait_connected(&b.handle.peer_id()).await;

    let bob = b.handle.status().await.unwrap();
    assert_eq!(bob.connected_peers.len(), 2);

    // Pings flow on both connections.
    let a_id = a.handle.peer_id().to_string();
    let rtt = b
        .wait_for("a ping to alice", |e| match &e.kind {
            EventKind::Ping { peer_id, rtt_ms } if *peer_id == a_id => Some(*rtt_ms),
            _ => None,
        })
        .await;
    assert!(
        rtt.is_finite() && rtt > 0.0,
        "a measured round trip: {rtt} ms"
    );

    // Dialing a peer we are already connected to answers at once.
    let again = b.tcp_addr().await;
    assert_eq!(a.handle.dial(again).await.unwrap(), b.handle.peer_id());
    // Dialing ourselves is refused.
    let own = a.tcp_addr().await;
    assert!(a.handle.dial(own).await.is_err());

    // Carol stops; bob sees her go.
    let c_id = c.handle.peer_id().to_string();
    c.stop().await;
    b.wait_for("carol's disconnect", |e| match &e.kind {
        EventKind::PeerDisconnected { peer_id } if *peer_id == c_id => Some(()),
        _ => None,
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn event_seq_survives_restart_and_resume_replays_the_gap() {
    let mut a = TestNode::spawn("alice").await;
    let before = a.handle.events().unwrap().next_seq();
    assert!(before > 1, "listening events were recorded");
    a.restart().await;
    let after = a.handle.events().unwrap().next_seq();
    assert!(
        after > before,
        "seq continues after restart: {before} -> {after}"
    );
    let sub = a.handle.subscribe(Some(before - 1)).unwrap();
    let seqs: Vec<u64> = sub.backlog.iter().map(|e| e.seq).collect();
    assert_eq!(seqs.first(), Some(&(before - 1 + 1)));
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap: {seqs:?}"
    );
    assert!(
        sub.backlog
            .iter()
            .any(|e| matches!(e.kind, EventKind::ShuttingDown)),
        "the shutdown before the restart is in the log"
    );
    a.stop().await;
}

#[tokio::test]
async fn a_second_node_on_the_same_dir_is_refused() {
    let a = TestNode::spawn("alice").await;
    let err = tern_node::Node::start(tern_node::NodeOptions {
        data_dir: a.data_dir(),
        config: tern_node::Config::loopback(),
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string().starts_with("a Tern daemon already uses"),
        "{err}"
    );
    a.stop().await;
}
