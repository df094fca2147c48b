//! Request paths as routes see them. pingora hands over the request target as the client
//! sent it, and upstreams resolve `.`/`..`, repeated slashes and percent-escapes in their
//! own ways; a route matched on the raw text can gate one path while the upstream serves
//! another (`/healthz/../v1/x` taking a public route, `/v1/./generate` charged as a plain
//! call). So the proxy normalises the path once, matches routes on the result, and
//! forwards exactly that path: the route that decides is the path that is served.
//!
//! The normal form (RFC 3986 6.2.2, made strict):
//! - percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, every
//!   other escape is kept with upper-case hex; characters a path may not hold raw
//!   (anything outside RFC 3986's `pchar` and `/`, and bytes beyond ASCII) are escaped;
//! - then dot segments are resolved (RFC 3986 5.2.4), `.`/`..` that came from `%2e`
//!   included, and repeated slashes collapse into one; a trailing slash stays;
//! - refused, as nothing safe can be made of them: `..` above the root, an encoded `/` or
//!   `\` (`%2F`, `%5C`, which upstreams disagree about), a raw `\`, control characters
//!   (raw or escaped, NUL included), a `%` not followed by two hex digits, a dot segment
//!   carrying `;` parameters (`..;`, which some servers resolve as `..`), and a target
//!   that is not a path (`*`).
//!
//! Pure functions on bytes: no pingora, no allocation for a path already in normal form.

use std::borrow::Cow;

/// Why a request path cannot be normalised (answered 400 `invalid_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target must be a path starting with '/'")]
    NotAbsolute,
    #[error("'..' climbs above the root")]
    AboveRoot,
    #[error("an encoded '/' or '\\' (%2F, %5C) is not allowed in a path")]
    EncodedSeparator,
    #[error("a '\\' is not allowed in a path")]
    Backslash,
    #[error("control characters (raw or percent-encoded) are not allowed in a path")]
    ControlCharacter,
    #[error("'%' must start a percent-escape of two hex digits")]
    InvalidEscape,
    #[error("a '.' or '..' segment may not carry ';' parameters")]
    DotSegmentParameters,
}

/// A request target split into its normalised path and its query (kept as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub path: Cow<'a, str>,
    /// The bytes after the first `?`, without it.
    pub query: Option<&'a [u8]>,
}

impl Target<'_> {
    /// The origin-form target to forward: the normalised path and the query.
    pub fn to_bytes(&self) -> Vec<u8> {
        let query_len = self.query.map_or(0, |query| query.len().saturating_add(1));
        let mut target = Vec::with_capacity(self.path.len().saturating_add(query_len));
        target.extend_from_slice(self.path.as_bytes());
        if let Some(query) = self.query {
            target.push(b'?');
            target.extend_from_slice(query);
        }
        target
    }
}

/// Splits an origin-form request target (`/path?query`) and normalises its path.
///
/// # Errors
/// What makes the path unusable (see [`PathError`]).
pub fn normalise_target(target: &[u8]) -> Result<Target<'_>, PathError> {
    let (path, query) = match target.iter().position(|byte| *byte == b'?') {
        Some(at) => (&target[..at], target.get(at.saturating_add(1)..)),
        None => (target, None),
    };
    Ok(Target {
        path: normalise(path)?,
        query,
    })
}

/// The normal form of a request path (without its query).
///
/// # Errors
/// What makes the path unusable (see [`PathError`]).
pub fn normalise(path: &[u8]) -> Result<Cow<'_, str>, PathError> {
    if path.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path)
        && let Ok(text) = std::str::from_utf8(path)
    {
        return Ok(Cow::Borrowed(text));
    }
    let decoded = decode(path)?;
    resolve(&decoded).map(Cow::Owned)
}

/// RFC 3986 `unreserved`: decoded wherever it was escaped.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// What a path may hold raw: RFC 3986 `pchar` (less `%`, handled apart) and `/`.
fn is_raw_path_byte(byte: u8) -> bool {
    is_unreserved(byte)
        || matches!(
            byte,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

/// Whether `path` is in normal form already (the common case, checked without
/// allocating): only raw path characters, no escapes, no empty segment but a trailing
/// one, no dot segment.
fn is_normal(path: &[u8]) -> bool {
    if !path.iter().all(|byte| is_raw_path_byte(*byte)) {
        return false;
    }
    let mut segments = path.split(|byte| *byte == b'/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || is_dot_segment(segment) {
            return false;
        }
    }
    true
}

/// `.` or `..`, with or without `;` parameters.
fn is_dot_segment(segment: &[u8]) -> bool {
    let name = segment
        .split(|byte| *byte == b';')
        .next()
        .unwrap_or(segment);
    name == b"." || name == b".."
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn push_escape(text: &mut String, byte: u8) {
    text.push('%');
    text.push(char::from(HEX_UPPER[usize::from(byte >> 4)]));
    text.push(char::from(HEX_UPPER[usize::from(byte & 0x0F)]));
}

/// Decodes unreserved escapes, upper-cases the others, escapes what may not stand raw.
/// The result is ASCII, and its `/` are exactly the raw ones (an escaped `/` is refused),
/// so segments can be resolved on it.
fn decode(path: &[u8]) -> Result<String, PathError> {
    let mut text = String::with_capacity(path.len());
    let mut index = 0usize;
    while let Some(&byte) = path.get(index) {
        index = index.saturating_add(1);
        match byte {
            b'%' => {
                let high = path.get(index).copied().and_then(hex_value);
                let low = path
                    .get(index.saturating_add(1))
                    .copied()
                    .and_then(hex_value);
                let (Some(high), Some(low)) = (high, low) else {
                    return Err(PathError::InvalidEscape);
                };
                index = index.saturating_add(2);
                let value = (high << 4) | low;
                if value == b'/' || value == b'\\' {
                    return Err(PathError::EncodedSeparator);
                }
                if value.is_ascii_control() {
                    return Err(PathError::ControlCharacter);
                }
                if is_unreserved(value) {
                    text.push(char::from(value));
                } else {
                    push_escape(&mut text, value);
                }
            }
            b'\\' => return Err(PathError::Backslash),
            _ if byte.is_ascii_control() => return Err(PathError::ControlCharacter),
            _ if is_raw_path_byte(byte) => text.push(char::from(byte)),
            _ => push_escape(&mut text, byte),
        }
    }
    Ok(text)
}

/// Resolves dot segments and collapses repeated slashes in a decoded path.
fn resolve(decoded: &str) -> Result<String, PathError> {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        if is_dot_segment(segment.as_bytes()) && segment.contains(';') {
            return Err(PathError::DotSegmentParameters);
        }
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                kept.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = true;
            }
            name => {
                kept.push(name);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for name in &kept {
        path.push('/');
        path.push_str(name);
    }
    if path.is_empty() || trailing_slash {
        path.push('/');
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> Result<String, PathError> {
        normalise(path.as_bytes()).map(Cow::into_owned)
    }

    #[test]
    fn paths_in_normal_form_are_borrowed_as_they_are() {
        for path in [
            "/",
            "/v1/generate",
            "/v1/x/",
            "/v1/a;b=c/d:e@f!$&'()*+,=",
            "/v1/.well-known/x",
            "/v1/...",
        ] {
            assert!(
                matches!(normalise(path.as_bytes()), Ok(Cow::Borrowed(text)) if text == path),
                "{path}"
            );
        }
    }

    #[test]
    fn dot_segments_and_repeated_slashes_are_resolved() {
        let cases = [
            ("/v1/./generate", "/v1/generate"),
            ("/healthz/../v1/x", "/v1/x"),
            ("//v1//x", "/v1/x"),
            ("/v1/x/.", "/v1/x/"),
            ("/v1/x/..", "/v1/"),
            ("/v1/x/../", "/v1/"),
            ("/healthz/..", "/"),
            ("/a/b/c/./../../g", "/a/g"),
            ("/v1/x//", "/v1/x/"),
            ("///", "/"),
        ];
        for (path, expected) in cases {
            assert_eq!(normal(path).as_deref(), Ok(expected), "{path}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_before_dot_segments_resolve() {
        let cases = [
            ("/v1/%2e/generate", "/v1/generate"),
            ("/v1/%2E%2E/healthz", "/healthz"),
            ("/v1/.%2e/healthz", "/healthz"),
            ("/%761/generate", "/v1/generate"),
            ("/v1/%7Euser/%41%62c", "/v1/~user/Abc"),
        ];
        for (path, expected) in cases {
            assert_eq!(normal(path).as_deref(), Ok(expected), "{path}");
        }
    }

    #[test]
    fn other_escapes_stay_escaped_in_upper_case_and_raw_oddities_get_escaped() {
        let cases = [
            ("/v1/caf%c3%a9", "/v1/caf%C3%A9"),
            ("/v1/a%20b", "/v1/a%20b"),
            ("/v1/a%3fb%23c", "/v1/a%3Fb%23c"),
            ("/v1/100%25", "/v1/100%25"),
            ("/v1/a b", "/v1/a%20b"),
            ("/v1/{x}|\"y\"", "/v1/%7Bx%7D%7C%22y%22"),
            ("/v1/caf\u{e9}", "/v1/caf%C3%A9"),
        ];
        for (path, expected) in cases {
            assert_eq!(normal(path).as_deref(), Ok(expected), "{path}");
        }
        // Not UTF-8 at all: escaped byte by byte.
        assert_eq!(
            normalise(b"/v1/\xff\xfe").map(Cow::into_owned).as_deref(),
            Ok("/v1/%FF%FE")
        );
    }

    #[test]
    fn what_cannot_be_normalised_is_refused() {
        let cases = [
            ("/..", PathError::AboveRoot),
            ("/../v1/x", PathError::AboveRoot),
            ("/v1/../../x", PathError::AboveRoot),
            ("/v1/%2e%2e/%2E%2E/x", PathError::AboveRoot),
            ("/v1/a%2fb", PathError::EncodedSeparator),
            ("/v1/a%2Fb", PathError::EncodedSeparator),
            ("/v1/a%5cb", PathError::EncodedSeparator),
            ("/v1\\x", PathError::Backslash),
            ("/v1/a%00b", PathError::ControlCharacter),
            ("/v1/a%0ab", PathError::ControlCharacter),
            ("/v1/a%7fb", PathError::ControlCharacter),
            ("/v1/a\u{0}b", PathError::ControlCharacter),
            ("/v1/a\tb", PathError::ControlCharacter),
            ("/v1/a%zzb", PathError::InvalidEscape),
            ("/v1/a%4", PathError::InvalidEscape),
            ("/v1/a%", PathError::InvalidEscape),
            ("/healthz/..;/v1/x", PathError::DotSegmentParameters),
            ("/v1/.;x/generate", PathError::DotSegmentParameters),
            ("*", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("v1/x", PathError::NotAbsolute),
        ];
        for (path, error) in cases {
            assert_eq!(normal(path), Err(error), "{path:?}");
        }
    }

    #[test]
    fn the_query_is_kept_as_sent_and_the_target_rebuilt() {
        let target = normalise_target(b"/v1/./x?a=%2F&b=/../c").expect("valid");
        assert_eq!(target.path, "/v1/x");
        assert_eq!(target.query, Some(&b"a=%2F&b=/../c"[..]));
        assert_eq!(target.to_bytes(), b"/v1/x?a=%2F&b=/../c");
        let bare = normalise_target(b"//v1//x?").expect("valid");
        assert_eq!(bare.to_bytes(), b"/v1/x?");
        let plain = normalise_target(b"/v1/x").expect("valid");
        assert_eq!((plain.query, plain.to_bytes()), (None, b"/v1/x".to_vec()));
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for path in [
            "/v1/./generate",
            "/%761/a%2e%2e/b",
            "/v1/caf%c3%a9//x/",
            "/v1/a b/../c",
        ] {
            let once = normal(path).expect("valid");
            assert_eq!(normal(&once).as_deref(), Ok(once.as_str()), "{path}");
        }
    }
}
