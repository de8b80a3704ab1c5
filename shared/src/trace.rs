//! W3C trace context as an event carries it: the publisher's `traceparent`, stored with the
//! event and sent along on the topic channel, so that every replica's delivery can be linked to
//! the publish that caused it. Checked once, when built; the Lua publish function checks the
//! same form.

use std::fmt;

/// A `traceparent` header value of version `00`: `00-<32 hex trace id>-<16 hex span id>-<2 hex
/// flags>`, lower-case, ids not all zero (<https://www.w3.org/TR/trace-context/>).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Traceparent(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("traceparent must be 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>, lower-case, ids not all zero")]
pub struct TraceparentError;

impl Traceparent {
    pub fn new(text: &str) -> Result<Traceparent, TraceparentError> {
        let parts: Vec<&str> = text.split('-').collect();
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
        match parts.as_slice() {
            ["00", trace, span, flags]
                if hex(trace, 32)
                    && hex(span, 16)
                    && hex(flags, 2)
                    && nonzero(trace)
                    && nonzero(span) =>
            {
                Ok(Traceparent(text.into()))
            }
            _ => Err(TraceparentError),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 32 hex digits of the trace id.
    pub fn trace_id(&self) -> &str {
        &self.0[3..35]
    }

    /// The 16 hex digits of the publisher's span id.
    pub fn span_id(&self) -> &str {
        &self.0[36..52]
    }

    /// Whether the publisher sampled its trace.
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.0[53..55], 16).is_ok_and(|flags| flags & 1 == 1)
    }
}

impl fmt::Display for Traceparent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Traceparent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Traceparent({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn form() {
        let t = Traceparent::new(VALID).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id(), "00f067aa0ba902b7");
        assert!(t.sampled());
        assert!(!Traceparent::new(&VALID.replace("-01", "-00"))
            .unwrap()
            .sampled());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
        ] {
            assert_eq!(Traceparent::new(bad), Err(TraceparentError), "{bad:?}");
        }
    }
}
