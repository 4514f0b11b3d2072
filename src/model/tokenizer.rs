//! OpenAI's CLIP byte-level BPE (vocabulary 49,408, shipped inside `instant-clip-tokenizer`),
//! with the seed's framing: `<|startoftext|>` + at most 75 tokens + `<|endoftext|>`, padded
//! with `<|endoftext|>` to 77 and a mask of the real tokens.

use instant_clip_tokenizer::{Token, Tokenizer};

pub const CONTEXT_LENGTH: usize = 77;
pub const START_OF_TEXT: u32 = 49406;
pub const END_OF_TEXT: u32 = 49407;

pub struct ClipTokenizer {
    bpe: Tokenizer,
    context_length: usize,
}

/// One caption, padded to the context length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedCaption {
    /// `context_length` ids: real tokens first, then `<|endoftext|>` padding.
    pub ids: Vec<u32>,
    /// Real tokens (start and end markers included): the mask is `i < len`.
    pub len: usize,
}

impl TokenizedCaption {
    pub fn mask(&self) -> Vec<bool> {
        (0..self.ids.len()).map(|i| i < self.len).collect()
    }

    pub fn real_ids(&self) -> &[u32] {
        &self.ids[..self.len]
    }
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new(CONTEXT_LENGTH)
    }
}

impl ClipTokenizer {
    /// Building the merge table takes a few milliseconds: build once, reuse.
    pub fn new(context_length: usize) -> Self {
        assert!(context_length >= 2, "room for the start and end markers");
        Self {
            bpe: Tokenizer::new(),
            context_length,
        }
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Start marker, the caption's BPE tokens truncated to `context_length - 2`, end marker.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut tokens: Vec<Token> = Vec::new();
        self.bpe.encode(&clean(text), &mut tokens);
        let room = self.context_length - 2;
        if tokens.len() > room {
            // Like CLIP itself, the encoder only sees the first tokens; the user should know
            // that the end of the prompt changes nothing.
            tracing::warn!(
                tokens = tokens.len(),
                kept = room,
                "prompt cut to the text encoder's {} positions: {:?} is dropped",
                self.context_length,
                self.bpe.decode(tokens[room..].iter().copied()).trim()
            );
        }
        tokens.truncate(room);
        std::iter::once(START_OF_TEXT)
            .chain(tokens.into_iter().map(|t| u32::from(t.to_u16())))
            .chain(std::iter::once(END_OF_TEXT))
            .collect()
    }

    /// How each real token of `text` reads, for labels: `<start>`, the word pieces without
    /// CLIP's `</w>` end-of-word marker, `<end>`; as many as [`Self::encode`] returns.
    pub fn token_labels(&self, text: &str) -> Vec<String> {
        self.encode(text)
            .into_iter()
            .map(|id| match id {
                START_OF_TEXT => "<start>".to_string(),
                END_OF_TEXT => "<end>".to_string(),
                id => {
                    let token = u16::try_from(id)
                        .ok()
                        .and_then(|id| Token::from_u16(id, &self.bpe));
                    token.map_or_else(
                        || format!("#{id}"),
                        |t| self.bpe.decode([t]).trim().to_string(),
                    )
                }
            })
            .collect()
    }

    pub fn tokenize(&self, text: &str) -> TokenizedCaption {
        let mut ids = self.encode(text);
        let len = ids.len();
        ids.resize(self.context_length, END_OF_TEXT);
        TokenizedCaption { ids, len }
    }
}

/// OpenAI's `basic_clean` + `whitespace_clean` without ftfy: HTML entities are unescaped (the
/// reference tokenizer runs `html.unescape` twice) and whitespace runs collapse to one space.
fn clean(text: &str) -> String {
    let unescaped = unescape_html(&unescape_html(text));
    unescaped.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn unescape_html(text: &str) -> String {
    const ENTITIES: [(&str, &str); 6] = [
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&quot;", "\""),
        ("&#39;", "'"),
        ("&apos;", "'"),
        ("&nbsp;", "\u{a0}"),
    ];
    // `&amp;` last, so that "&amp;lt;" becomes "&lt;" in one pass, as Python's unescape does.
    let mut out = text.to_string();
    for (entity, plain) in ENTITIES {
        out = out.replace(entity, plain);
    }
    out.replace("&amp;", "&")
}
