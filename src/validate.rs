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

/// Provider kinds (spec §10): `openai` is any OpenAI-compatible API.
pub const PROVIDER_KINDS: [&str; 5] = ["openai", "anthropic", "gemini", "azure", "bedrock"];

pub fn provider_kind(s: &str) -> bool {
    PROVIDER_KINDS.contains(&s)
}

/// An AWS region's shape: lowercase words joined by `-`, the first of two letters, the last a
/// number of one or two digits (`us-east-1`, `us-gov-west-1`, `ap-southeast-2`), ≤ 32 bytes.
pub fn aws_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return false;
    };
    s.len() <= 32
        && first.len() == 2
        && first.bytes().all(|b| b.is_ascii_lowercase())
        && !middle.is_empty()
        && middle
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        && (1..=2).contains(&last.len())
        && last.bytes().all(|b| b.is_ascii_digit())
}

/// Azure OpenAI's `api-version`: 1–32 of `[A-Za-z0-9.-]` (`2024-10-21`, `2025-04-01-preview`,
/// `preview`): it goes into a query string as is.
pub fn api_version(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
}

/// The Bedrock runtime endpoint of `region` (the `.com.cn` domain for China's regions).
pub fn bedrock_base_url(region: &str) -> String {
    if region.starts_with("cn-") {
        format!("https://bedrock-runtime.{region}.amazonaws.com.cn")
    } else {
        format!("https://bedrock-runtime.{region}.amazonaws.com")
    }
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

    #[test]
    fn provider_kinds_and_aws_regions() {
        for k in ["openai", "anthropic", "gemini", "azure", "bedrock"] {
            assert!(provider_kind(k), "{k}");
        }
        assert!(!provider_kind("OpenAI"));
        assert!(!provider_kind("vertex"));
        for r in [
            "us-east-1",
            "us-gov-west-1",
            "ap-southeast-2",
            "eu-central-1",
            "cn-north-1",
        ] {
            assert!(aws_region(r), "{r}");
        }
        for r in [
            "",
            "us",
            "us-east",
            "US-EAST-1",
            "us-east-123",
            "use-east-1",
            "us--1",
            "us-east-1 ",
            "us-east-1/x",
            "us-east-1a",
        ] {
            assert!(!aws_region(r), "{r:?}");
        }
        assert_eq!(
            bedrock_base_url("us-east-1"),
            "https://bedrock-runtime.us-east-1.amazonaws.com"
        );
        assert_eq!(
            bedrock_base_url("cn-north-1"),
            "https://bedrock-runtime.cn-north-1.amazonaws.com.cn"
        );
        assert!(api_version("2024-10-21") && api_version("2025-04-01-preview"));
        assert!(!api_version("") && !api_version("2024&x=1") && !api_version(&"1".repeat(33)));
    }
}
