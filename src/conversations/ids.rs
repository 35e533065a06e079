//! Ids of stored objects, OpenAI-shaped: a type prefix (`resp_`, `conv_`, `msg_`, `fc_`, …,
//! `chatcmpl-`), 12 hex digits of milliseconds (ids of one kind sort by creation, so indexes grow
//! at their end), and 32 hex digits of OS randomness (128 bits: an id is not guessable, and
//! ownership never rests on it alone anyway).

/// `prefix` + time + 128 random bits, e.g. `resp_0193a1b2c3d4` + 32 hex digits.
pub fn new_id(prefix: &str) -> String {
    let millis = chrono::Utc::now().timestamp_millis().max(0) as u64 & 0xffff_ffff_ffff;
    let random: u128 = rand::random();
    format!("{prefix}{millis:012x}{random:032x}")
}

pub fn response_id() -> String {
    new_id("resp_")
}

pub fn conversation_id() -> String {
    new_id("conv_")
}

/// `chatcmpl-…`: what a stored chat completion is saved under when the upstream's own id is
/// missing or not to be trusted as unique (see `save_completion`).
pub fn completion_id() -> String {
    new_id("chatcmpl-")
}

/// The id prefix OpenAI gives an item of this `type`; `item_` for types it has none for.
pub fn item_prefix(item_type: &str) -> &'static str {
    match item_type {
        "message" => "msg_",
        "function_call" => "fc_",
        "function_call_output" => "fco_",
        "reasoning" => "rs_",
        "web_search_call" => "ws_",
        "file_search_call" => "fs_",
        "computer_call" => "cu_",
        "computer_call_output" => "cuo_",
        "image_generation_call" => "ig_",
        "code_interpreter_call" => "ci_",
        "local_shell_call" => "lsh_",
        "local_shell_call_output" => "lsho_",
        "mcp_call" => "mcp_",
        "mcp_list_tools" => "mcpl_",
        "mcp_approval_request" => "mcpr_",
        "mcp_approval_response" => "mcpa_",
        "custom_tool_call" => "ctc_",
        "custom_tool_call_output" => "ctco_",
        _ => "item_",
    }
}

/// A new id for an item of this `type`.
pub fn item_id(item_type: &str) -> String {
    new_id(item_prefix(item_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_prefix_and_128_random_bits() {
        let a = response_id();
        let b = response_id();
        assert!(a.starts_with("resp_"), "{a}");
        assert_eq!(a.len(), "resp_".len() + 12 + 32);
        assert_ne!(a, b);
        assert_ne!(a[5 + 12..], b[5 + 12..], "random parts differ");
        assert!(a[5..].chars().all(|c| c.is_ascii_hexdigit()));
        assert!(conversation_id().starts_with("conv_"));
        assert!(completion_id().starts_with("chatcmpl-"));
        assert!(item_id("message").starts_with("msg_"));
        assert!(item_id("function_call").starts_with("fc_"));
        assert!(item_id("something_new").starts_with("item_"));
    }

    #[test]
    fn ids_of_one_kind_sort_by_time() {
        let a = new_id("x_");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id("x_");
        assert!(a[..14] < b[..14], "{a} {b}");
    }
}
