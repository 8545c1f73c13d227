//! Byte-level tokenizer: ids 0..=255 are bytes; special tokens follow.

pub const PAD: u32 = 256;
pub const USER: u32 = 257;
pub const ASSISTANT: u32 = 258;
pub const END: u32 = 259;
pub const VOCAB: usize = 260;

/// `<|user|> prompt <|assistant|>`: what a model continues to answer.
pub fn encode_prompt(prompt: &str) -> Vec<u32> {
    let mut ids = Vec::with_capacity(prompt.len() + 2);
    ids.push(USER);
    ids.extend(prompt.bytes().map(u32::from));
    ids.push(ASSISTANT);
    ids
}

/// The response's tokens, ending with `<|end|>`.
pub fn encode_response(response: &str) -> Vec<u32> {
    let mut ids: Vec<u32> = response.bytes().map(u32::from).collect();
    ids.push(END);
    ids
}

/// Text of generated ids, stopping at `<|end|>`; other special tokens are dropped.
pub fn decode(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids
        .iter()
        .take_while(|&&t| t != END)
        .filter(|&&t| t < 256)
        .map(|&t| t as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut ids = encode_prompt("add 2 3");
        assert_eq!(ids[0], USER);
        assert_eq!(*ids.last().unwrap(), ASSISTANT);
        ids = encode_response("5");
        assert_eq!(ids, vec![b'5' as u32, END]);
        assert_eq!(decode(&[b'h' as u32, b'i' as u32, END, b'x' as u32]), "hi");
    }
}
