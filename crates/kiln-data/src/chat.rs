//! Chat templates: the Jinja template a model ships in `tokenizer_config.json` (or GGUF metadata),
//! rendered with minijinja the way transformers' `apply_chat_template` renders it
//! (`trim_blocks`, `lstrip_blocks`, `raise_exception`, Python string methods).

use crate::DataError;
use serde::{Deserialize, Serialize};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Instructions one render may execute before it fails.
pub const RENDER_FUEL: u64 = 5_000_000;

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// More variables for the template, as `apply_chat_template(**kwargs)` passes them
    /// (`enable_thinking` for Qwen3's and SmolLM3's templates).
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

impl ChatTemplate {
    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// answer begins.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates come from model files: bound the work one render may do (a real template
        // spends a few hundred units per message).
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| DataError::Other(format!("chat template does not parse: {e}")))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                ..minijinja::Value::from_serialize(&self.kwargs)
            })
            .map_err(|e| DataError::Other(format!("chat template failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's template, as its tokenizer_config.json and GGUF metadata carry it.
    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn runaway_templates_stop_long_conversations_render() {
        let t = |source: &str| ChatTemplate {
            source: source.into(),
            bos_token: String::new(),
            eos_token: String::new(),
            kwargs: Default::default(),
        };
        let start = std::time::Instant::now();
        let e = t("{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}")
            .render(&[Message::new("user", "Hi")], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fuel"), "{e}");
        assert!(start.elapsed().as_secs() < 10);
        let long: Vec<Message> = (0..2000)
            .map(|i| Message::new(["user", "assistant"][i % 2], "some words of a turn"))
            .collect();
        assert!(t(SMOL).render(&long, true).is_ok());
    }

    #[test]
    fn renders_like_transformers() {
        let t = ChatTemplate {
            source: SMOL.into(),
            bos_token: "<|im_start|>".into(),
            eos_token: "<|im_end|>".into(),
            kwargs: Default::default(),
        };
        let out = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let strip = ChatTemplate {
            source: "{{ messages[0]['content'].strip() }}{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}".into(),
            ..t
        };
        assert_eq!(
            strip
                .render(&[Message::new("user", "  x ")], false)
                .unwrap(),
            "x"
        );
        assert!(
            strip
                .render(
                    &[Message::new("user", "a"), Message::new("user", "b")],
                    false
                )
                .is_err()
        );
    }
}
