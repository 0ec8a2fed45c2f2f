//! A careless desk system that opens an `Inbox` stream, reads its delivery
//! and drops the stream, again and again, never acknowledging. Each stream
//! ends with its consumer cancelled and its channel closed; no frame may
//! follow the close on that channel, or the broker ends the whole
//! connection ("expected 'channel.open'", seen once in CI), and every other
//! stream and every `Submit` of the service with it. The connection stays
//! up throughout, and the delivery is still there for the next stream.
//!
//! And one that acknowledges each delivery and drops its stream at the same
//! moment: the acknowledgement's broker ack goes out on the stream's
//! channel, so the stream's end waits for it before the channel closes.

use std::collections::HashSet;
use std::time::Duration;

use refbus_proto::v1::AcknowledgeRequest;
use refbus_tests::fixtures::{DESK, published_legal_help};
use refbus_tests::{Amqp, TestBus, acknowledge, inbox_stream, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_again_and_again_costs_no_one_the_connection() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let queue = bus.inbox_queue(DESK);
    let request = published_legal_help("churn");
    amqp.publish_envelope(&queue, &request).await;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut connection = bus.shared.bus.connection();
    assert!(connection.is_up());

    for round in 0..300 {
        let mut stream = inbox_stream(&mut desk, DESK, 1).await;
        let delivery = within("the request again", stream.message())
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"))
            .unwrap();
        assert_eq!(delivery.envelope.unwrap().id, request.id, "round {round}");
        drop(stream);
    }

    // The connection never changed state: a change during the loop would
    // be seen at once; the grace is for a close still in flight.
    let changed = tokio::time::timeout(Duration::from_secs(1), connection.changed()).await;
    assert!(
        changed.is_err() && connection.is_up(),
        "the service's broker connection was lost while streams came and went"
    );
    // Nothing lost: the request is delivered once more, and acknowledged.
    let mut stream = inbox_stream(&mut desk, DESK, 1).await;
    let delivery = refbus_tests::next_message("the request at the end", &mut stream).await;
    assert_eq!(delivery.envelope.unwrap().id, request.id);
    acknowledge(&mut desk, DESK, delivery.delivery_token).await;
    drop(stream);
    bus.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_as_its_delivery_is_acknowledged_costs_no_one_the_connection() {
    const REQUESTS: usize = 150;
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let queue = bus.inbox_queue(DESK);
    let mut requests = HashSet::new();
    for i in 0..REQUESTS {
        let request = published_legal_help(&format!("ack-and-drop-{i}"));
        amqp.publish_envelope(&queue, &request).await;
        requests.insert(request.id);
    }
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut connection = bus.shared.bus.connection();
    assert!(connection.is_up());

    // Each round: a delivery, its Acknowledge sent and the stream dropped
    // at once. An acknowledgement that lost the race to the stream's end
    // is refused (not pending) and the request comes again.
    let mut acknowledged = HashSet::new();
    let mut rounds = 0;
    while acknowledged.len() < REQUESTS {
        rounds += 1;
        assert!(
            rounds < 20 * REQUESTS,
            "{} of {REQUESTS} acknowledged after {rounds} rounds",
            acknowledged.len()
        );
        let mut stream = inbox_stream(&mut desk, DESK, 1).await;
        let delivery = within("a request", stream.message())
            .await
            .unwrap_or_else(|e| panic!("round {rounds}: {e}"))
            .unwrap();
        let id = delivery.envelope.unwrap().id;
        assert!(
            !acknowledged.contains(&id),
            "round {rounds}: {id} handed over again after it was acknowledged"
        );
        let mut client = desk.clone();
        let acknowledging = tokio::spawn(async move {
            client
                .acknowledge(AcknowledgeRequest {
                    agency: DESK.into(),
                    delivery_token: delivery.delivery_token,
                    ..Default::default()
                })
                .await
        });
        drop(stream);
        if acknowledging.await.unwrap().is_ok() {
            acknowledged.insert(id);
        }
    }
    assert_eq!(acknowledged, requests);

    let changed = tokio::time::timeout(Duration::from_secs(1), connection.changed()).await;
    assert!(
        changed.is_err() && connection.is_up(),
        "the service's broker connection was lost while acknowledged streams were dropped"
    );
    // Every broker ack went out: nothing is left in the queue once the
    // last stream's channel has closed.
    assert_eq!(amqp.settled_count(&queue).await, 0);
    bus.stop().await;
}
