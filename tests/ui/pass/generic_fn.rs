use std::fmt::Display;
use std::str::FromStr;

use cache_runtime::cached;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[cached(ttl = 60)]
async fn parse<T>(text: &str) -> Option<T>
where
    T: FromStr + Serialize + DeserializeOwned,
{
    text.parse().ok()
}

// A type parameter inside the shape is fine: the rule follows `Result`.
#[cached(ttl = 60)]
async fn try_parse<T, E>(text: &str) -> Result<T, E>
where
    T: FromStr<Err = E> + Serialize + DeserializeOwned,
{
    text.parse()
}

#[cached(key = "show:{value}", ttl = 60)]
async fn show<V: Display + ?Sized>(value: &V) -> String {
    value.to_string()
}

#[cached(ttl = 60)]
async fn repeat<const N: usize>(byte: u8) -> Vec<u8> {
    vec![byte; N]
}

fn main() {
    let _ = parse::<u32>("1");
    let _ = try_parse::<u32, _>("1");
    let _ = show("x");
    let _ = repeat::<3>(7);
}
