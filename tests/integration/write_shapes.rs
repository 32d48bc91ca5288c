//! `#[cache_put]`, `#[cache_evict]` and `tags`: the shapes users write (value from an argument or from `result`, `unless`, `condition`), identical on both backends.

use cache_runtime::{Cache, cache_evict, cache_put, cached};

use crate::support::{Calls, User, on_both_backends};

#[cached(cache = cache, key = "user:{id}", name = "read")]
async fn read(cache: &Cache, calls: &Calls, id: u64) -> Result<User, String> {
    calls.hit();
    Ok(User::new(id))
}

#[cached(cache = cache, key = "user:{id}", tags = ["org:{org}"], name = "read_tagged")]
async fn read_tagged(cache: &Cache, calls: &Calls, org: u64, id: u64) -> Option<User> {
    calls.hit();
    Some(User::new(id + org * 1000))
}

#[cache_put(cache = cache, key = "user:{id}", name = "rename")]
async fn rename(cache: &Cache, id: u64, name: &str, fail: bool) -> Result<User, String> {
    if fail {
        return Err("update failed".to_owned());
    }
    Ok(User {
        id,
        name: name.to_owned(),
    })
}

#[cache_put(cache = cache, key = "user:{id}", tags = ["org:{org}"])]
async fn rename_tagged(cache: &Cache, org: u64, id: u64, name: &str) -> Option<User> {
    let _ = org;
    Some(User {
        id,
        name: name.to_owned(),
    })
}

#[cache_put(cache = cache, key = "user:{id}", value = user, unless = result.is_err())]
async fn save(cache: &Cache, id: u64, user: User, ok: bool) -> Result<(), String> {
    let _ = (id, user);
    if ok { Ok(()) } else { Err("no".to_owned()) }
}

#[cache_put(cache = cache, key = "user:{id}", value = &result.as_ref().unwrap().0, condition = id > 0)]
async fn save_row(cache: &Cache, id: u64, name: String) -> Result<(User, u32), String> {
    Ok((User { id, name }, 7))
}

#[cache_evict(cache = cache, keys = ["user:{id}", "user_profile:{id}", "user_list"], name = "on_user_updated")]
async fn on_user_updated(cache: &Cache, id: u64, ok: bool) -> Result<(), String> {
    let _ = id;
    if ok {
        Ok(())
    } else {
        Err("update failed".to_owned())
    }
}

#[cache_evict(cache = cache, keys = ["user:{id}"], before, condition = id != 13)]
async fn evict_before(cache: &Cache, id: u64, ok: bool) -> Option<()> {
    let _ = id;
    ok.then_some(())
}

#[cache_evict(cache = cache, tags = ["org:{org}"], name = "on_org_changed")]
async fn on_org_changed(cache: &Cache, org: u64) {
    let _ = org;
}

on_both_backends! {
    async fn put_writes_through(fx: Fx) {
        let calls = Calls::default();
        assert_eq!(read(&fx.cache, &calls, 1).await.unwrap(), User::new(1));
        let renamed = rename(&fx.cache, 1, "Ada", false).await.unwrap();
        assert_eq!(read(&fx.cache, &calls, 1).await.unwrap(), renamed);
        assert_eq!(calls.get(), 1, "the put's value is a hit");
        assert_eq!(fx.cache.stats().function("rename").unwrap().puts, 1);
    }

    async fn failed_put_writes_nothing(fx: Fx) {
        let calls = Calls::default();
        assert!(rename(&fx.cache, 2, "Ada", true).await.is_err());
        assert_eq!(read(&fx.cache, &calls, 2).await.unwrap(), User::new(2));
        assert_eq!(calls.get(), 1, "nothing was written");
    }

    async fn put_of_a_value(fx: Fx) {
        let calls = Calls::default();
        let ada = User { id: 3, name: "Ada".to_owned() };
        save(&fx.cache, 3, ada.clone(), true).await.unwrap();
        assert_eq!(read(&fx.cache, &calls, 3).await.unwrap(), ada);
        let grace = User { id: 3, name: "Grace".to_owned() };
        assert!(save(&fx.cache, 3, grace, false).await.is_err());
        assert_eq!(read(&fx.cache, &calls, 3).await.unwrap(), ada, "a failure writes nothing");
        save_row(&fx.cache, 3, "Hopper".to_owned()).await.unwrap();
        assert_eq!(read(&fx.cache, &calls, 3).await.unwrap().name, "Hopper");
        assert_eq!(calls.get(), 0);
    }

    async fn tagged_readers_need_tagged_puts(fx: Fx) {
        let calls = Calls::default();
        // Written without the reader's tag: not served to it.
        rename(&fx.cache, 4, "untagged", false).await.unwrap();
        assert_eq!(read_tagged(&fx.cache, &calls, 1, 4).await.unwrap(), User::new(1004));
        assert_eq!(calls.get(), 1);
        // Written with it: served.
        let put = rename_tagged(&fx.cache, 1, 4, "tagged").await.unwrap();
        assert_eq!(read_tagged(&fx.cache, &calls, 1, 4).await.unwrap(), put);
        assert_eq!(calls.get(), 1);
        // Its tag invalidated: loaded again.
        on_org_changed(&fx.cache, 1).await;
        assert_eq!(read_tagged(&fx.cache, &calls, 1, 4).await.unwrap(), User::new(1004));
        assert_eq!(calls.get(), 2);
        assert_eq!(fx.cache.stats().function("on_org_changed").unwrap().tag_invalidations, 1);
    }

    async fn evict_after_success_only(fx: Fx) {
        let calls = Calls::default();
        read(&fx.cache, &calls, 5).await.unwrap();
        fx.cache.set("user_list", &[5u64], std::time::Duration::from_secs(60)).await.unwrap();
        assert!(on_user_updated(&fx.cache, 5, false).await.is_err());
        read(&fx.cache, &calls, 5).await.unwrap();
        assert_eq!(calls.get(), 1, "a failed call evicts nothing");
        on_user_updated(&fx.cache, 5, true).await.unwrap();
        read(&fx.cache, &calls, 5).await.unwrap();
        assert_eq!(calls.get(), 2, "evicted");
        assert_eq!(fx.cache.get::<Vec<u64>>("user_list").await.unwrap(), None);
        assert_eq!(fx.cache.stats().function("on_user_updated").unwrap().evictions, 1);
    }

    async fn evict_before_and_condition(fx: Fx) {
        let calls = Calls::default();
        read(&fx.cache, &calls, 6).await.unwrap();
        assert_eq!(evict_before(&fx.cache, 6, false).await, None);
        read(&fx.cache, &calls, 6).await.unwrap();
        assert_eq!(calls.get(), 2, "`before` evicted although the call failed");
        read(&fx.cache, &calls, 13).await.unwrap();
        evict_before(&fx.cache, 13, true).await.unwrap();
        read(&fx.cache, &calls, 13).await.unwrap();
        assert_eq!(calls.get(), 3, "`condition` false evicts nothing");
    }
}
