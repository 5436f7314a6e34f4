//! Text in and out of a model: tokenizer plus chat template, and the description both are
//! rebuilt from (kept in client bundles so they work without the model file).

use serde::{Deserialize, Serialize};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::gguf::GgufFile;
use crate::tokenizer::{Tokenizer, TokenizerSpec};
use crate::ModelError;

/// What a [`TextCodec`] is built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextSpec {
    pub tokenizer: TokenizerSpec,
    pub chat_template: Option<String>,
}

impl TextSpec {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        Ok(TextSpec {
            tokenizer: TokenizerSpec::from_gguf(file)?,
            chat_template: if file.has_key("tokenizer.chat_template") {
                Some(file.get_str("tokenizer.chat_template")?.to_string())
            } else {
                // files without a template: the architecture's own format, if it has one
                file.get_str("general.architecture")
                    .ok()
                    .and_then(crate::chat::builtin_template)
                    .map(str::to_string)
            },
        })
    }
}

/// Tokenizer and chat template of one model.
#[derive(Debug)]
pub struct TextCodec {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub spec: TextSpec,
}

impl TextCodec {
    pub fn new(spec: TextSpec) -> Result<Self, ModelError> {
        let tokenizer = Tokenizer::from_spec(&spec.tokenizer)?;
        let chat_template = spec
            .chat_template
            .as_deref()
            .map(|src| {
                let t = &spec.tokenizer;
                ChatTemplate::new(src, &t.token_text(t.bos), &t.token_text(Some(t.eos)))
            })
            .transpose()?;
        Ok(TextCodec {
            tokenizer,
            chat_template,
            spec,
        })
    }

    /// Token ids for a user prompt: rendered as one user turn with the chat template (and
    /// the generation prompt), or taken as-is when `raw`. Control-token text is parsed.
    pub fn prompt_tokens(&self, prompt: &str, raw: bool) -> Result<Vec<u32>, ModelError> {
        let text = if raw {
            prompt.to_string()
        } else {
            self.chat_text(&[ChatMessage::new("user", prompt)])?
        };
        self.encode_prompt(&text)
    }

    /// Render a conversation with the chat template, ending with the assistant's turn.
    pub fn chat_text(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::Template("this model has no chat template; use --raw".into())
        })?;
        template.render(messages, true)
    }

    /// Tokenize prompt text (control tokens parsed), adding BOS if the model asks for it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        if self.tokenizer.add_bos {
            if let Some(bos) = self.tokenizer.bos {
                ids.push(bos);
            }
        }
        ids.extend(self.tokenizer.encode(text, true)?);
        Ok(ids)
    }
}
