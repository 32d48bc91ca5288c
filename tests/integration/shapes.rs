//! The shapes of functions the attribute accepts: methods, generics, reference arguments,
//! `#[async_trait]` impls, default keys; and that the rewrite keeps the signature.

use std::fmt::Display;
use std::str::FromStr;
use std::sync::LazyLock;

use async_trait::async_trait;
use cache_runtime::{Cache, cached};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::support::{Calls, User};

static SHAPES: LazyLock<Cache> = LazyLock::new(Cache::memory);

pub struct Repo {
    cache: Cache,
    tenant: String,
    pub calls: Calls,
}

#[derive(Serialize)]
pub struct Query {
    pub org: Org,
    pub page: u32,
}

#[derive(Serialize)]
pub struct Org {
    pub id: u64,
}

impl Repo {
    fn new(tenant: &str) -> Repo {
        Repo {
            cache: Cache::memory(),
            tenant: tenant.to_owned(),
            calls: Calls::default(),
        }
    }

    /// Keeps its docs.
    #[cached(cache = self.cache, key = "repo:{self.tenant}:{id}")]
    pub async fn get(&self, id: u64) -> Result<User, String> {
        self.calls.hit();
        Ok(User::new(id))
    }

    /// A field path, a raw identifier and a tuple index in the key.
    #[cached(cache = self.cache, key = "search:{q.org.id}:{q.page}:{r#type}:{pair.1}")]
    pub async fn search(&self, q: &Query, r#type: &str, pair: (u8, u8)) -> Vec<u64> {
        self.calls.hit();
        vec![
            q.org.id,
            u64::from(q.page),
            r#type.len() as u64,
            u64::from(pair.1),
        ]
    }

    /// Default key: the type, the method and the arguments.
    #[cached(cache = SHAPES)]
    pub async fn by_name(&self, name: &str, ids: &[u64]) -> String {
        self.calls.hit();
        format!("{name}:{ids:?}")
    }
}

pub struct OtherRepo {
    pub calls: Calls,
}

impl OtherRepo {
    /// Same method name and arguments as `Repo::by_name`, different type: another key.
    #[cached(cache = SHAPES)]
    pub async fn by_name(&self, name: &str, ids: &[u64]) -> String {
        self.calls.hit();
        format!("other {name}:{ids:?}")
    }
}

static PARSE_CALLS: Calls = Calls::new();

/// Generic over the parsed type: `parse::<u32>` and `parse::<i64>` are different entries.
#[cached(cache = SHAPES)]
async fn parse<T>(text: &str) -> Option<T>
where
    T: FromStr + Serialize + DeserializeOwned,
{
    PARSE_CALLS.hit();
    text.parse().ok()
}

#[cached(cache = SHAPES, key = "show:{value}")]
async fn show<V: Display + ?Sized>(calls: &Calls, value: &V) -> String {
    calls.hit();
    value.to_string()
}

/// Integer placeholders of every width, by value and by reference, next to a `-` separator.
#[cached(cache = SHAPES, key = "ints:{a}-{b}:{c}:{d}")]
async fn ints(a: i64, b: &i32, c: usize, d: &&u8) -> String {
    format!("{a} {b} {c} {d}")
}

#[async_trait]
pub trait UserStore {
    async fn load(&self, id: u64) -> Result<User, String>;
    async fn load_default_key(&self, id: u64) -> Result<User, String>;
}

pub struct PgStore {
    cache: Cache,
    region: &'static str,
    pub calls: Calls,
}

#[async_trait]
impl UserStore for PgStore {
    #[cached(cache = self.cache, key = "store:{self.region}:{id}", ttl = "10m")]
    async fn load(&self, id: u64) -> Result<User, String> {
        self.calls.hit();
        Ok(User::new(id))
    }

    #[cached(cache = self.cache)]
    async fn load_default_key(&self, id: u64) -> Result<User, String> {
        self.calls.hit();
        Ok(User::new(id + 1))
    }
}

/// Rewritten functions keep visibility, attributes and `must_use`.
#[must_use]
#[cached(cache = SHAPES, key = "kept:{x}")]
pub(crate) async fn kept(x: u8) -> u8 {
    #![allow(clippy::let_and_return)]
    let y = x;
    y
}

/// One-line bodies stay on one line (`unused_braces` only looks at one-line blocks), in a
/// crate that denies warnings and is checked by clippy.
#[rustfmt::skip]
mod one_line {
    use async_trait::async_trait;
    use cache_runtime::cached;

    use super::{Repo, SHAPES};
    use crate::support::Calls;

    pub static COUNTED: Calls = Calls::new();

    #[cached(cache = SHAPES)]
    pub async fn plain(id: u64) -> u64 { id * 2 }

    #[cached(cache = SHAPES, key = "one-line:counted")]
    pub async fn counted() -> u32 { COUNTED.hit() }

    #[cached(cache = SHAPES, key = "one-line:result:{id}")]
    pub async fn result(id: u64) -> Result<u64, String> { Ok(id) }

    #[cached(cache = SHAPES)]
    pub async fn option(id: u64) -> Option<u64> { Some(id) }

    #[cached(cache = SHAPES, key = "one-line:string:{id}")]
    pub async fn string(id: u64) -> String { format!("{id}") }

    impl Repo {
        #[cached(cache = self.cache, key = "one-line:tenant")]
        pub async fn tenant(&self) -> String { self.tenant.clone() }

        #[cached(cache = self.cache)]
        pub async fn double(&self, id: u64) -> Result<u64, String> { Ok(id * 2) }
    }

    #[async_trait]
    pub trait Doubler {
        async fn double(&self, id: u64) -> Option<u64>;
    }

    #[async_trait]
    impl Doubler for Repo {
        #[cached(cache = self.cache, key = "one-line:doubler:{id}")]
        async fn double(&self, id: u64) -> Option<u64> { Some(id * 2) }
    }
}

#[tokio::test]
async fn methods_use_self_fields_in_keys() {
    let a = Repo::new("acme");
    let b = Repo::new("globex");
    assert_eq!(a.get(1).await, Ok(User::new(1)));
    assert_eq!(a.get(1).await, Ok(User::new(1)));
    assert_eq!(a.calls.get(), 1);
    assert_eq!(
        a.cache.get::<User>("repo:acme:1").await.unwrap(),
        Some(User::new(1))
    );
    assert_eq!(b.get(1).await, Ok(User::new(1)));
    assert_eq!(b.calls.get(), 1);

    let q = Query {
        org: Org { id: 4 },
        page: 2,
    };
    assert_eq!(a.search(&q, "ab", (0, 9)).await, vec![4, 2, 2, 9]);
    assert_eq!(a.search(&q, "ab", (0, 9)).await, vec![4, 2, 2, 9]);
    assert_eq!(a.calls.get(), 2);
    assert!(
        a.cache
            .get::<Vec<u64>>("search:4:2:ab:9")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn default_keys_separate_types_methods_and_arguments() {
    let repo = Repo::new("x");
    let other = OtherRepo {
        calls: Calls::default(),
    };
    assert_eq!(repo.by_name("a", &[1, 2]).await, "a:[1, 2]");
    assert_eq!(repo.by_name("a", &[1, 2]).await, "a:[1, 2]");
    assert_eq!(repo.calls.get(), 1);
    assert_eq!(other.by_name("a", &[1, 2]).await, "other a:[1, 2]");
    assert_eq!(
        other.calls.get(),
        1,
        "same method name on another type is another key"
    );
    assert_eq!(repo.by_name("a", &[1, 3]).await, "a:[1, 3]");
    assert_eq!(repo.by_name("a:", &[1, 2]).await, "a::[1, 2]");
    assert_eq!(repo.calls.get(), 3);
}

#[tokio::test]
async fn generic_functions_key_by_type_parameter() {
    let calls = &PARSE_CALLS;
    assert_eq!(parse::<u32>("42").await, Some(42));
    assert_eq!(parse::<u32>("42").await, Some(42));
    assert_eq!(calls.get(), 1);
    assert_eq!(parse::<i64>("42").await, Some(42));
    assert_eq!(calls.get(), 2, "another type parameter is another entry");
    assert_eq!(parse::<u8>("300").await, None);

    assert_eq!(show(calls, "str").await, "str");
    assert_eq!(show(calls, &5u8).await, "5");
}

#[tokio::test]
async fn integer_placeholders_render_like_display() {
    assert_eq!(ints(-1, &2, 3, &&4).await, "-1 2 3 4");
    // `-` separates two placeholders, so a negative value's `-` is escaped.
    assert_eq!(
        SHAPES.get::<String>("ints:%2D1-2:3:4").await.unwrap(),
        Some("-1 2 3 4".to_owned())
    );
    assert_eq!(
        ints(i64::MIN, &i32::MAX, usize::MAX, &&u8::MAX).await.len(),
        56
    );
}

#[tokio::test]
async fn async_trait_impls() {
    let store = PgStore {
        cache: Cache::memory(),
        region: "eu",
        calls: Calls::default(),
    };
    let dynamic: &dyn UserStore = &store;
    assert_eq!(dynamic.load(3).await, Ok(User::new(3)));
    assert_eq!(dynamic.load(3).await, Ok(User::new(3)));
    assert_eq!(store.calls.get(), 1);
    assert_eq!(
        store.cache.get::<User>("store:eu:3").await.unwrap(),
        Some(User::new(3))
    );
    assert_eq!(dynamic.load_default_key(3).await, Ok(User::new(4)));
    assert_eq!(dynamic.load_default_key(3).await, Ok(User::new(4)));
    assert_eq!(store.calls.get(), 2);

    // The future is Send, as async_trait requires.
    let handle = tokio::spawn(async move { store.load(5).await });
    assert_eq!(handle.await.unwrap(), Ok(User::new(5)));
}

#[tokio::test]
async fn signature_and_attributes_are_kept() {
    let f: fn(u8) -> _ = kept;
    assert_eq!(f(3).await, 3);
    assert_eq!(kept(3).await, 3);
}

#[test]
fn cached_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let repo = Repo::new("s");
    assert_send(&parse::<u32>("1"));
    assert_send(&repo.get(1));
    assert_send(&kept(1));
}

#[tokio::test]
async fn one_line_bodies() {
    use one_line::Doubler;

    assert_eq!(one_line::plain(2).await, 4);
    assert_eq!(one_line::counted().await, 1);
    assert_eq!(one_line::counted().await, 1, "cached");
    assert_eq!(one_line::COUNTED.get(), 1);
    assert_eq!(one_line::result(3).await, Ok(3));
    assert_eq!(one_line::option(3).await, Some(3));
    assert_eq!(one_line::string(3).await, "3");
    let repo = Repo::new("acme");
    assert_eq!(repo.tenant().await, "acme");
    assert_eq!(Repo::double(&repo, 2).await, Ok(4));
    assert_eq!(Doubler::double(&repo, 2).await, Some(4));
    assert_eq!(
        repo.cache.get::<u64>("one-line:doubler:2").await.unwrap(),
        Some(4)
    );
}
