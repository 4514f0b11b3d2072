//! The `text_encoder:` section: where the frozen CLIP encoder's weights come from, beside the
//! encoder's own [`ClipTextConfig`], in one flat mapping (`weights` next to the sizes).
//!
//! The sizes' keys, defaults and checks are `ClipTextConfig`'s own; this module only sets
//! `weights` aside. serde's `flatten` would do that, but it buffers the values, so errors would
//! lose their key path and line, and unknown keys would pass: instead every key and value is
//! read through the YAML deserialiser itself, and an unknown key is refused where it stands,
//! listing `weights` and the sizes' keys.

use std::sync::OnceLock;

use serde::de::value::StringDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::model::ClipTextConfig;

/// Key of the weights location, the one key that is not `ClipTextConfig`'s.
const WEIGHTS: &str = "weights";

/// The frozen CLIP text encoder; defaults are OpenAI's ViT-B/32 text tower, randomly initialised.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TextEncoderSpec {
    /// Pretrained weights (`hf://openai/clip-vit-base-patch32`, a path, or a store URL);
    /// unset (null) = a seeded random initialisation, which needs no network.
    pub weights: Option<String>,
    /// The tower's sizes, written beside `weights` (`text_encoder.hidden_size`, ...).
    #[serde(flatten)]
    pub config: ClipTextConfig,
}

impl<'de> Deserialize<'de> for TextEncoderSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_struct("TextEncoderSpec", keys(), SectionVisitor)
    }
}

struct SectionVisitor;

impl<'de> Visitor<'de> for SectionVisitor {
    type Value = TextEncoderSpec;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("struct TextEncoderSpec")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TextEncoderSpec, A::Error> {
        let mut sizes = WeightsAside { map, weights: None };
        let config =
            ClipTextConfig::deserialize(de::value::MapAccessDeserializer::new(&mut sizes))?;
        Ok(TextEncoderSpec {
            weights: sizes.weights.flatten(),
            config,
        })
    }
}

/// The section's mapping as `ClipTextConfig` sees it: `weights` is read into `weights` and
/// skipped, every other entry passes through untouched.
struct WeightsAside<A> {
    map: A,
    /// `Some` once the key was read (its value may be null).
    weights: Option<Option<String>>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for WeightsAside<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        while let Some(SectionKey(key)) = self.map.next_key()? {
            if key != WEIGHTS {
                let key: StringDeserializer<A::Error> = key.into_deserializer();
                return seed.deserialize(key).map(Some);
            }
            if self.weights.is_some() {
                return Err(de::Error::duplicate_field(WEIGHTS));
            }
            self.weights = Some(self.map.next_value()?);
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// A key of the section, checked while the YAML deserialiser still knows its line.
struct SectionKey(String);

impl<'de> Deserialize<'de> for SectionKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = SectionKey;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a text_encoder key")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<SectionKey, E> {
                match keys().contains(&key) {
                    true => Ok(SectionKey(key.to_string())),
                    false => Err(E::unknown_field(key, keys())),
                }
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// `weights`, then the keys `ClipTextConfig`'s `Deserialize` accepts.
fn keys() -> &'static [&'static str] {
    static KEYS: OnceLock<Vec<&'static str>> = OnceLock::new();
    KEYS.get_or_init(|| {
        std::iter::once(WEIGHTS)
            .chain(struct_fields::<ClipTextConfig>().iter().copied())
            .collect()
    })
}

/// The field names a derived `Deserialize` passes to `deserialize_struct` (all it accepts).
fn struct_fields<T: de::DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // It always fails: FieldNames reads the names and holds no data.
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field names read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}
