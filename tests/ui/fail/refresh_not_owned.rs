use cache_runtime::{Cache, cached};

/// Neither `Clone` nor `ToOwned`: a refresh cannot take its own copy.
pub struct Db;

impl Db {
    fn row(&self, id: u64) -> String {
        format!("row {id}")
    }
}

#[cached(key = "by_ref:{id}", refresh = "80%")]
async fn by_ref(db: &Db, id: u64) -> String {
    db.row(id)
}

#[cached(key = "by_value:{id}", refresh = "80%")]
async fn by_value(db: Db, id: u64) -> String {
    db.row(id)
}

/// Not `Clone`.
pub struct Repo {
    cache: Cache,
    db: Db,
}

impl Repo {
    #[cached(cache = self.cache, key = "method:{id}", refresh)]
    async fn method(&self, id: u64) -> String {
        self.db.row(id)
    }
}

fn main() {}
