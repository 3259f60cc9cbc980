//! [`AuthChallenge`]: what a registry's `WWW-Authenticate` header asks
//! for: HTTP Basic, or a bearer token from a token server (`realm`,
//! `service`, `scope`), per the distribution token authentication spec.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthChallenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        /// The scope the registry said the request needs, if it said.
        scope: Option<String>,
        /// `insufficient_scope`, `invalid_token`, ... if given.
        error: Option<String>,
    },
}

impl AuthChallenge {
    /// Parses a `WWW-Authenticate` value; `None` if it has no challenge
    /// naiad can answer.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, rest) = match header.find(char::is_whitespace) {
            Some(i) => (&header[..i], &header[i..]),
            None => (header, ""),
        };
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(AuthChallenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(rest);
        let realm = params.get("realm")?.clone();
        if realm.is_empty() {
            return None;
        }
        Some(AuthChallenge::Bearer { realm, service: params.get("service").cloned(), scope: params.get("scope").cloned(), error: params.get("error").cloned() })
    }
}

/// `key=value` or `key="quoted \" value"` pairs separated by commas; keys lower-cased.
fn parse_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() && chars.peek().is_none() {
            break;
        }
        if chars.next() != Some('=') {
            if chars.peek().is_none() {
                break;
            }
            continue;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_string();
        }
        out.insert(key.trim().to_ascii_lowercase(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let c = AuthChallenge::parse(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull,push""#).unwrap();
        assert_eq!(
            c,
            AuthChallenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull,push".into()),
                error: None
            }
        );
        let c = AuthChallenge::parse(r#"bearer realm=http://127.0.0.1:1/token, error="insufficient_scope""#).unwrap();
        assert!(matches!(c, AuthChallenge::Bearer { ref realm, ref error, .. } if realm == "http://127.0.0.1:1/token" && error.as_deref() == Some("insufficient_scope")));
        assert_eq!(AuthChallenge::parse(r#"Basic realm="Registry Realm""#), Some(AuthChallenge::Basic));
        assert_eq!(AuthChallenge::parse("Negotiate"), None);
        assert_eq!(AuthChallenge::parse(r#"Bearer service="x""#), None);
    }
}
