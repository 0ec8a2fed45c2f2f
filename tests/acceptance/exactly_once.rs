//! Issue 5: exactly once after deduplication. An agency's `Inbox` never
//! hands its system the same id twice once that id was acknowledged: not
//! when a retried `Submit` published it twice, not when the same message
//! comes again later, not through another instance of the service.

use refbus_gateway::AgencyService;
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_tests::fixtures::{CENTRE, DESK, legal_help_at, submit};
use refbus_tests::{Amqp, Inbox, ServiceInstance, TestBus, acknowledge, channel_to};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_id_is_never_handed_over_again() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let queue = bus.inbox_queue(DESK);
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let now = chrono::Utc::now();

    // A Submit retried with the same idempotency key: the same id, published twice.
    let request = legal_help_at("dup-1", now);
    let first = centre
        .submit(submit(request.clone()))
        .await
        .unwrap()
        .into_inner();
    let again = centre.submit(submit(request)).await.unwrap().into_inner();
    assert_eq!(first.id, again.id);
    assert_eq!(amqp.counts(&queue).await.0, 2, "two copies on the queue");

    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    let delivery = inbox.next().await;
    let envelope = delivery.envelope.clone().unwrap();
    assert_eq!(envelope.id, first.id);
    acknowledge(&mut desk, DESK, delivery.delivery_token).await;

    // The second copy is not handed over: the next delivery is a sentinel
    // submitted after it.
    let sentinel = centre
        .submit(submit(legal_help_at("dup-2", now)))
        .await
        .unwrap()
        .into_inner();
    let next = inbox.next().await;
    assert_eq!(
        next.envelope.unwrap().id,
        sentinel.id,
        "the duplicate was dropped"
    );
    acknowledge(&mut desk, DESK, next.delivery_token).await;
    drop(inbox);

    // Later, the same message once more (a late redelivery), read through
    // another instance of the legal-aid service sharing the inbox state:
    // still not handed over.
    amqp.publish_envelope(&queue, &envelope).await;
    let legal_aid =
        ServiceInstance::start(bus.shared.settings.clone(), AgencyService::LegalAid).await;
    let addr = legal_aid.addr;
    let last = centre
        .submit(submit(legal_help_at("dup-3", now)))
        .await
        .unwrap()
        .into_inner();
    let mut other = GatewayClient::new(channel_to(addr, DESK).await);
    let mut inbox = Inbox::open(&mut other, DESK).await;
    let next = inbox.next().await;
    assert_eq!(
        next.envelope.unwrap().id,
        last.id,
        "the late copy was dropped"
    );
    acknowledge(&mut other, DESK, next.delivery_token).await;
    drop(inbox);
    assert_eq!(amqp.settled_count(&queue).await, 0, "nothing left behind");
    legal_aid.stop().await;
    amqp.close().await;
    bus.stop().await;
}
