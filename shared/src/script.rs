//! The Redis side of the contract: key and channel layout (streams, idempotency records,
//! channels, presence reports), the Lua library the gateway loads (`ssegw_publish`,
//! `ssegw_read`, with the fleet's retention compiled in), the same publish logic as a plain
//! `EVAL` script, and the message format the publish logic sends on a topic's channel.

use crate::event_id::StreamId;
use crate::frame::EventType;
use crate::retention::{Limits, Retention};
use crate::topic::Topic;
use crate::trace::Traceparent;

/// The name of the function library in `FUNCTION LIST`.
pub const LIBRARY_NAME: &str = "ssegw";
pub const PUBLISH_FUNCTION: &str = "ssegw_publish";
pub const READ_FUNCTION: &str = "ssegw_read";
/// `FCALL ssegw_version 0`: the library's `LIBRARY_VERSION`.
pub const VERSION_FUNCTION: &str = "ssegw_version";
/// `FCALL ssegw_channels 0`: `"sharded"` when the library publishes with `SPUBLISH` (for Redis
/// Cluster), `"global"` when with `PUBLISH`. Missing in libraries before version 3, which
/// publish with `PUBLISH`.
pub const CHANNELS_FUNCTION: &str = "ssegw_channels";

/// `FCALL ssegw_retention 0`: the fleet's retention table compiled into the library, in
/// [`Retention`]'s text form. Missing in libraries before version 4, whose settings were the
/// flags of the replica that loaded them.
pub const RETENTION_FUNCTION: &str = "ssegw_retention";

/// `FCALL ssegw_m_publish 4 <mercure_keys> <update id> <blob> [<traceparent>]`: appends a
/// Mercure update to the hub's log, indexes its id and publishes it (library version 5).
pub const MERCURE_PUBLISH_FUNCTION: &str = "ssegw_m_publish";
/// `FCALL_RO ssegw_m_find 4 <mercure_keys> <update id>`: the log entry of an update id, or
/// an empty string.
pub const MERCURE_FIND_FUNCTION: &str = "ssegw_m_find";
/// `FCALL ssegw_m_track 6 <mercure_keys> <MERCURE_SUBSCRIPTIONS> <mercure_replica_key>
/// add|del|reap|leave <ttl ms> (<field> <doc> <update id> <update>)...`: stores or removes a replica's
/// active Mercure subscriptions and publishes the update of each change (library version 6).
pub const MERCURE_TRACK_FUNCTION: &str = "ssegw_m_track";
/// `FCALL ssegw_m_beat 1 <MERCURE_SUBSCRIPTIONS> <replica> <ttl ms> <count>`: keeps a replica's
/// subscriptions alive and hands out those of a dead replica to reap.
pub const MERCURE_BEAT_FUNCTION: &str = "ssegw_m_beat";
/// `FCALL_RO ssegw_m_subscriptions 2 <log stream key> <MERCURE_SUBSCRIPTIONS> [<id>]`: the
/// log's last entry and its update id, and the listed replicas' subscription documents (only
/// the one with that id, if given).
pub const MERCURE_SUBSCRIPTIONS_FUNCTION: &str = "ssegw_m_subscriptions";
/// The replicas that hold active Mercure subscriptions, each scored with the Redis time (ms)
/// at which it counts as dead unless it beats again.
pub const MERCURE_SUBSCRIPTIONS: &str = "ssegw:m:{ssegw.mercure}:subs";

/// The hash of a replica's active Mercure subscriptions: field the subscription's id, value
/// its JSON document. In the log's slot, as every Mercure key.
pub fn mercure_replica_key(replica: &str) -> String {
    format!("{MERCURE_SUBSCRIPTIONS}:r:{replica}")
}

/// The function library's version, raised with every change of its functions. A newer
/// library keeps answering the calls of older gateways (same function names and arguments),
/// so during a rolling upgrade a gateway never replaces a newer library with its own older
/// one. Version 1 was the library before `ssegw_version` existed; version 3 added sharded
/// channels (`ssegw_channels`); version 4 the fleet's retention per namespace
/// (`ssegw_retention`), idempotency keys and cheaper publishes and reads; version 5 the
/// Mercure hub's log (`ssegw_m_publish`, `ssegw_m_find`) and the reserved `ssegw.` topics;
/// version 6 the Mercure hub's active subscriptions (`ssegw_m_track`, `ssegw_m_beat`,
/// `ssegw_m_subscriptions`).
pub const LIBRARY_VERSION: u64 = 6;

const CORE: &str = include_str!("../lua/core.lua");

/// What is compiled into the Lua code when it is loaded.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ScriptSettings {
    /// The fleet's retention table.
    pub retention: Retention,
    /// Publish on sharded channels (`SPUBLISH`), for Redis Cluster: each event then travels
    /// only within its topic's shard, not over the whole cluster's bus. Subscribers must use
    /// `SSUBSCRIBE`.
    pub sharded: bool,
}

impl ScriptSettings {
    /// What `ssegw_channels` answers for a library with these settings.
    pub fn channels(&self) -> &'static str {
        if self.sharded {
            "sharded"
        } else {
            "global"
        }
    }
}

fn lua_limits(limits: &Limits) -> String {
    format!(
        "len = {}, slack = {}, ttl = {}, data = {}",
        limits.max_len,
        limits.slack(),
        limits.ttl_secs,
        limits.max_data_bytes
    )
}

/// The Lua that precedes `core.lua`: `SHARDED`, `DEFAULT`, `NAMESPACES` (longest prefix first,
/// so that the first match is the longest) and `RETENTION_TEXT`. Prefixes are topic prefixes
/// (`retention::check_prefix`), so they need no escaping between quotes.
fn settings_block(s: &ScriptSettings) -> String {
    let r = &s.retention;
    let mut namespaces: Vec<_> = r.namespaces().collect();
    namespaces.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    let mut out = format!(
        "local SHARDED = {}\nlocal DEFAULT = {{{}}}\nlocal NAMESPACES = {{\n",
        s.sharded,
        lua_limits(r.default_limits())
    );
    for (prefix, limits) in namespaces {
        out.push_str(&format!(
            "  {{prefix = '{prefix}', n = {}, {}}},\n",
            prefix.len(),
            lua_limits(limits)
        ));
    }
    out.push_str(&format!(
        "}}\nlocal RETENTION_TEXT = [[\n{}]]\n",
        r.to_text()
    ));
    out
}

/// The function library for `FUNCTION LOAD REPLACE`.
pub fn function_library(settings: &ScriptSettings) -> String {
    format!(
        "#!lua name={LIBRARY_NAME}\n{}{CORE}\nredis.register_function('{PUBLISH_FUNCTION}', publish)\n\
         redis.register_function{{function_name='{READ_FUNCTION}', callback=read, flags={{'no-writes'}}}}\n\
         redis.register_function{{function_name='{VERSION_FUNCTION}', callback=function() return {LIBRARY_VERSION} end, flags={{'no-writes'}}}}\n\
         redis.register_function{{function_name='{CHANNELS_FUNCTION}', callback=function() return '{}' end, flags={{'no-writes'}}}}\n\
         redis.register_function{{function_name='{RETENTION_FUNCTION}', callback=function() return RETENTION_TEXT end, flags={{'no-writes'}}}}\n\
         redis.register_function('{MERCURE_PUBLISH_FUNCTION}', mercure_publish)\n\
         redis.register_function{{function_name='{MERCURE_FIND_FUNCTION}', callback=mercure_find, flags={{'no-writes'}}}}\n\
         redis.register_function('{MERCURE_TRACK_FUNCTION}', mercure_track)\n\
         redis.register_function('{MERCURE_BEAT_FUNCTION}', mercure_beat)\n\
         redis.register_function{{function_name='{MERCURE_SUBSCRIPTIONS_FUNCTION}', callback=mercure_subscriptions, flags={{'no-writes'}}}}\n",
        settings_block(settings),
        settings.channels()
    )
}

/// The publish logic as a plain script: `EVAL <script> 1 <topic> <data> [<event>]`. It
/// carries the retention table it was made with: unlike the library, it does not follow the
/// fleet's changes.
pub fn publish_eval_script(settings: &ScriptSettings) -> String {
    format!(
        "{}{CORE}\nreturn publish(KEYS, ARGV)\n",
        settings_block(settings)
    )
}

/// The keys every Mercure function declares, in order: the log's stream and the two
/// generations of its id index and the name of the current one, all tagged with the log topic
/// (one Redis Cluster slot).
pub fn mercure_keys(log: &Topic) -> [String; 4] {
    [
        stream_key(log),
        format!("ssegw:m:{{{log}}}:ids:0"),
        format!("ssegw:m:{{{log}}}:ids:1"),
        format!("ssegw:m:{{{log}}}:gen"),
    ]
}

/// The key of an idempotency record: the first publish's id for `key` on `topic`.
pub fn idempotency_key(topic: &Topic, key: &IdempotencyKey) -> String {
    format!("ssegw:i:{{{topic}}}:{key}")
}

/// An idempotency key as the publish function accepts it: 1 to 255 bytes of printable ASCII
/// without spaces.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an idempotency key is 1 to 255 bytes of printable ASCII without spaces")]
pub struct IdempotencyKeyError;

impl IdempotencyKey {
    pub fn new(key: &str) -> Result<IdempotencyKey, IdempotencyKeyError> {
        if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(IdempotencyKeyError);
        }
        Ok(IdempotencyKey(key.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The stream holding a topic's history.
pub fn stream_key(topic: &Topic) -> String {
    format!("ssegw:s:{{{topic}}}")
}

/// A replica's presence report for a topic: `<subscribers> <reported-at ms>`, written every
/// reporting interval with an expiry, so that a replica that stops reporting drops out by
/// itself. The topic is the hash tag: in a Redis Cluster every replica's report of a topic is
/// on the topic's shard, and one `MGET` reads them all.
pub fn presence_key(topic: &Topic, replica: &str) -> String {
    format!("ssegw:p:{{{topic}}}:{replica}")
}

/// The replicas that report presence: a sorted set of replica ids, each scored with the Redis
/// time (milliseconds) at which its last report expires; entries past it are removed by the
/// next report of any replica. A reader learns from it whose reports to look for.
pub const PRESENCE_REPLICAS: &str = "ssegw:p:replicas";

const CHANNEL_PREFIX: &str = "ssegw:c:{";

/// The pub/sub channel a topic's events are published on.
pub fn channel(topic: &Topic) -> String {
    format!("{CHANNEL_PREFIX}{topic}}}")
}

/// The topic of a channel name built by [`channel`]; `None` for any other channel.
pub fn topic_of_channel(channel: &str) -> Option<Topic> {
    let name = channel.strip_prefix(CHANNEL_PREFIX)?.strip_suffix('}')?;
    Topic::new(name).ok()
}

/// An event as the publish logic sends it on a topic channel: header lines (`i<id>`,
/// `e<event>`, `t<traceparent>`; unknown tags are ignored so that later versions can add
/// fields), a blank line, then the data verbatim.
#[derive(Debug, PartialEq, Eq)]
pub struct ChannelMessage<'a> {
    pub id: StreamId,
    pub event: Option<&'a str>,
    /// The publisher's trace context; an invalid one is dropped, the event still delivered.
    pub traceparent: Option<Traceparent>,
    /// Set for a Mercure update (header `m<update id>`): `data` is its encoded blob.
    pub mercure: bool,
    pub data: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed channel message")]
pub struct MessageError;

impl<'a> ChannelMessage<'a> {
    pub fn parse(payload: &'a [u8]) -> Result<ChannelMessage<'a>, MessageError> {
        let mut rest = payload;
        let mut id = None;
        let mut event = None;
        let mut traceparent = None;
        let mut mercure = false;
        loop {
            let end = rest.iter().position(|&b| b == b'\n').ok_or(MessageError)?;
            let (line, tail) = (&rest[..end], &rest[end + 1..]);
            rest = tail;
            match line.split_first() {
                None => break,
                Some((b'i', value)) => {
                    let text = std::str::from_utf8(value).map_err(|_| MessageError)?;
                    id = Some(StreamId::parse(text).map_err(|_| MessageError)?);
                }
                Some((b'e', value)) => {
                    // Framed verbatim into an `event:` line: a CR in it would start a forged
                    // field, so only what the publish logic itself accepts gets through.
                    let text = std::str::from_utf8(value).map_err(|_| MessageError)?;
                    EventType::new(text).map_err(|_| MessageError)?;
                    event = Some(text);
                }
                Some((b't', value)) => {
                    traceparent = std::str::from_utf8(value)
                        .ok()
                        .and_then(|t| Traceparent::new(t).ok());
                }
                Some((b'm', _)) => mercure = true,
                Some(_) => {}
            }
        }
        Ok(ChannelMessage {
            id: id.ok_or(MessageError)?,
            event,
            traceparent,
            mercure,
            data: rest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_uses_the_topic_as_hash_tag() {
        let t = Topic::new("orders.eu").unwrap();
        assert_eq!(stream_key(&t), "ssegw:s:{orders.eu}");
        assert_eq!(channel(&t), "ssegw:c:{orders.eu}");
        assert_eq!(presence_key(&t, "r1"), "ssegw:p:{orders.eu}:r1");
        assert_eq!(topic_of_channel(&channel(&t)), Some(t));
        assert_eq!(topic_of_channel("other"), None);
        assert_eq!(topic_of_channel("ssegw:c:{a b}"), None);
    }

    #[test]
    fn parses_channel_messages() {
        let m = ChannelMessage::parse(b"i5-1\neorder\n\nline1\nline2").unwrap();
        assert_eq!(m.id, StreamId::new(5, 1));
        assert_eq!(m.event, Some("order"));
        assert_eq!(m.data, b"line1\nline2");
        let m = ChannelMessage::parse(b"i5-1\nxfuture-field\n\n").unwrap();
        assert_eq!((m.event, m.data), (None, &b""[..]));
        assert!(!m.mercure);
        let m = ChannelMessage::parse(b"i5-1\nmurn:uuid:1\n\nm1\n").unwrap();
        assert!(m.mercure);
        assert_eq!(m.data, b"m1\n");
        let m = ChannelMessage::parse(
            b"i5-1\nt00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n\nx",
        )
        .unwrap();
        assert_eq!(m.traceparent.unwrap().span_id(), "00f067aa0ba902b7");
        let m = ChannelMessage::parse(b"i5-1\ntnot-a-traceparent\n\nx").unwrap();
        assert_eq!((m.traceparent, m.data), (None, &b"x"[..]));
        assert_eq!(ChannelMessage::parse(b"eorder\n\nx"), Err(MessageError));
        assert_eq!(ChannelMessage::parse(b"i5-1\n"), Err(MessageError));
        assert_eq!(ChannelMessage::parse(b"ix\n\n"), Err(MessageError));
        assert_eq!(
            ChannelMessage::parse(b"i5-1\nea\rid: 9-0\rdata: forged\n\nx"),
            Err(MessageError)
        );
    }

    /// `lua/publish.lua` is shipped for `EVAL` users; it must be the generated script.
    #[test]
    fn shipped_eval_script_is_current() {
        let shipped = include_str!("../lua/publish.lua");
        assert!(
            shipped == publish_eval_script(&ScriptSettings::default()),
            "shared/lua/publish.lua is stale: regenerate it with `sse-gateway script --eval > shared/lua/publish.lua`"
        );
    }

    proptest::proptest! {
        /// A topic's keys and channel are its own: two topics never share one, none is another
        /// topic's key or channel, and none is one of the gateway's own names (`ssegw:canary:*`).
        #[test]
        fn topics_reach_only_their_own_keys(a in "[a-zA-Z0-9._:/@-]{1,40}", b in "[a-zA-Z0-9._:/@-]{1,40}") {
            let (ta, tb) = (Topic::new(&a).unwrap(), Topic::new(&b).unwrap());
            let names = |t: &Topic| [stream_key(t), channel(t)];
            for name in names(&ta) {
                proptest::prop_assert!(!name.starts_with("ssegw:canary:"));
                proptest::prop_assert_eq!(name.matches('{').count(), 1);
                if a != b {
                    proptest::prop_assert!(!names(&tb).contains(&name), "{} shared by {} and {}", name, a, b);
                }
            }
            proptest::prop_assert_eq!(topic_of_channel(&channel(&ta)), Some(ta.clone()));
            proptest::prop_assert_ne!(stream_key(&ta), channel(&ta));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = ChannelMessage::parse(&bytes);
        }
    }
}
