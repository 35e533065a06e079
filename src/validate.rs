//! Input rules shared by the API and the config: names, passwords, keys.

/// username: 3–32 of `[A-Za-z0-9_.-]`.
pub fn username(s: &str) -> bool {
    (3..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// password: 8–128 characters (not bytes).
pub fn password(s: &str) -> bool {
    (8..=128).contains(&s.chars().count())
}

/// provider key: 1–64 of `[a-z0-9_-]`.
pub fn provider_key(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

/// A plausible e-mail address (one `@`, something on each side, no spaces), ≤ 255 bytes.
pub fn email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    s.len() <= 255
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.contains(char::is_whitespace)
        && !domain.contains('@')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(username("alice_01.x-y"));
        assert!(!username("al"));
        assert!(!username("a".repeat(33).as_str()));
        assert!(!username("alice bob"));
        assert!(!username("ålice"));
    }

    #[test]
    fn passwords_count_characters() {
        assert!(password("12345678"));
        assert!(!password("1234567"));
        assert!(password(&"é".repeat(128)));
        assert!(!password(&"é".repeat(129)));
    }

    #[test]
    fn emails() {
        assert!(email("a@b.co"));
        assert!(!email("a@b"));
        assert!(!email("@b.co"));
        assert!(!email("a b@c.de"));
    }
}
