//! What a replica's subscriptions cost Redis under churn: a topic whose last client left stays
//! subscribed for a moment, so a client that comes straight back (a reload, a dropped
//! connection resuming) costs no SUBSCRIBE or UNSUBSCRIBE, and the topics left meanwhile are
//! unsubscribed together. Counted from Redis's own `INFO commandstats`.

mod support;

use std::time::{Duration, Instant};

use support::{Gateway, RedisServer, Sse};

/// Calls of `command` Redis has served so far.
fn calls(redis: &RedisServer, command: &str) -> u64 {
    let info: String = redis.cmd(redis::cmd("INFO").arg("commandstats")).unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0)
}

/// Replicas subscribed to `topic`'s channel.
fn numsub(redis: &RedisServer, topic: &str) -> i64 {
    let reply: (String, i64) = redis
        .cmd(
            redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(format!("ssegw:c:{{{topic}}}")),
        )
        .unwrap();
    reply.1
}

async fn until_unsubscribed(redis: &RedisServer, topics: &[String]) -> Duration {
    let start = Instant::now();
    while topics.iter().any(|t| numsub(redis, t) != 0) {
        assert!(
            start.elapsed() < support::WAIT,
            "the replica kept its subscriptions after the last clients left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[actix_web::test]
async fn a_client_that_comes_straight_back_costs_redis_no_subscription() {
    let redis = RedisServer::start();
    let gateway = Gateway::with_redis(&redis, &[]);
    let mut first = Sse::open(&gateway, "topic=page", None).await;
    let id = redis.fcall_publish("page", "one", None);
    assert_eq!(first.next().await.id, id);
    let (subscribes, unsubscribes) = (calls(&redis, "subscribe"), calls(&redis, "unsubscribe"));

    // The client leaves and resumes at once, ten times over.
    let mut last = id;
    for i in 0..10 {
        drop(first);
        first = Sse::open(&gateway, "topic=page", Some(&last)).await;
        last = redis.fcall_publish("page", &format!("again {i}"), None);
        assert_eq!(first.next().await.id, last);
    }
    assert_eq!(calls(&redis, "subscribe"), subscribes, "no SUBSCRIBE");
    assert_eq!(calls(&redis, "unsubscribe"), unsubscribes, "no UNSUBSCRIBE");
    assert_eq!(numsub(&redis, "page"), 1);

    // Once it is gone for good the topic is unsubscribed, after the linger.
    drop(first);
    let took = until_unsubscribed(&redis, &["page".to_string()]).await;
    assert!(
        took >= Duration::from_millis(500),
        "unsubscribed after {took:?}, before the linger"
    );
    assert_eq!(calls(&redis, "unsubscribe"), unsubscribes + 1);

    // And a client that comes later subscribes again, and receives.
    let mut later = Sse::open(&gateway, "topic=page", None).await;
    assert_eq!(calls(&redis, "subscribe"), subscribes + 1);
    let id = redis.fcall_publish("page", "later", None);
    assert_eq!(later.next().await.id, id);
}

#[actix_web::test]
async fn topics_left_together_are_unsubscribed_together() {
    let redis = RedisServer::start();
    let gateway = Gateway::with_redis(&redis, &[]);
    let topics: Vec<String> = (0..50).map(|i| format!("user-{i}")).collect();
    let mut clients = Vec::new();
    for topic in &topics {
        clients.push(Sse::open(&gateway, &format!("topic={topic}"), None).await);
    }
    assert!(topics.iter().all(|t| numsub(&redis, t) == 1));
    let unsubscribes = calls(&redis, "unsubscribe");
    drop(clients);
    until_unsubscribed(&redis, &topics).await;
    let used = calls(&redis, "unsubscribe") - unsubscribes;
    // One command, or two if the linger's tick fell in the middle of the leaving.
    assert!(
        (1..=2).contains(&used),
        "50 topics left together took {used} UNSUBSCRIBE commands"
    );
}
