//! A careless desk system that opens an `Inbox` stream, reads its delivery
//! and drops the stream, again and again, never acknowledging. Each stream
//! ends with its consumer cancelled and its channel closed; no frame may
//! follow the close on that channel, or the broker ends the whole
//! connection ("expected 'channel.open'", seen once in CI), and every other
//! stream and every `Submit` of the service with it. The connection stays
//! up throughout, and the delivery is still there for the next stream.

use std::time::Duration;

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
    let delivery = within("the request at the end", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery.envelope.unwrap().id, request.id);
    acknowledge(&mut desk, DESK, delivery.delivery_token).await;
    drop(stream);
    bus.stop().await;
}
