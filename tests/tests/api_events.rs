//! The local API's event subscription when its reader falls behind: the plain subscription
//! ends (the daemon closes it with `LAGGED`, or the client's own buffer overflows), and
//! `ApiClient::events` resumes from the event log with `since`, so the reader still sees
//! every event once and in order.

use std::time::Duration;

use tern_node::{api::client::ApiClient, events::EventKind};
use tern_tests::TestNode;

/// Events published at once, far more than the 1,024 a subscriber may lag behind.
const N: usize = 5_000;
const WAIT: Duration = Duration::from_secs(60);

fn event(n: usize) -> EventKind {
    EventKind::ContactAdded {
        name: format!("c{n}"),
        peer_id: format!("p{n}"),
        auto_added: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_resumes_without_losing_an_event() {
    let node = TestNode::spawn("alice").await;
    let server = tern_node::api::serve(node.handle.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = ApiClient::connect(node.handle.data_dir()).await.unwrap();
    let bus = node.handle.events().unwrap();
    // Something seen first, so the resuming stream knows where it stands.
    let mut resuming = client.events(None).await.unwrap();
    let mut plain = client.subscribe(None).await.unwrap();
    let first = bus.publish(event(0)).seq;
    let got = tokio::time::timeout(WAIT, resuming.next()).await.unwrap();
    assert_eq!(got.unwrap().unwrap().seq, first);

    // Nobody reads while they are published.
    for n in 1..=N {
        bus.publish(event(n));
    }

    // The plain subscription ends early: the scenario does make a reader lag.
    let mut plain_seen = 0;
    while let Some(e) = tokio::time::timeout(WAIT, plain.next()).await.unwrap() {
        e.unwrap();
        plain_seen += 1;
    }
    // It also had event 0: N + 1 in all.
    assert!(
        plain_seen < N + 1,
        "the plain subscription got all {plain_seen}: no reader lagged"
    );

    // The resuming stream gets every one of them, in order, once.
    let mut expected = 1;
    let mut last = first;
    while expected <= N {
        let e = tokio::time::timeout(WAIT, resuming.next())
            .await
            .unwrap_or_else(|_| panic!("stalled before event {expected}"))
            .expect("the stream ended")
            .unwrap();
        assert!(e.seq > last, "seq {} after {last}", e.seq);
        last = e.seq;
        if let EventKind::ContactAdded { name, .. } = &e.kind
            && name.starts_with('c')
        {
            assert_eq!(*name, format!("c{expected}"), "missing or out of order");
            expected += 1;
        }
    }
    assert_eq!(resuming.last_seq(), Some(last));
    drop(resuming);
    drop(client);
    server.stop().await;
    node.stop().await;
}
