//! The wording of option errors: what each option takes, and why an option is rejected.

use super::Kind;

pub(super) fn value_hint(option: &str) -> String {
    match option {
        "key" => "`key` takes a string literal template, e.g. `key = \"user:{id}\"`".to_owned(),
        "keys" => {
            "`keys` takes an array of string literal templates, e.g. `keys = [\"user:{id}\", \"user_list\"]`"
                .to_owned()
        }
        "tags" => {
            "`tags` takes an array of string literal templates, e.g. `tags = [\"org:{org_id}\"]`"
                .to_owned()
        }
        "name" => "`name` takes a string literal, e.g. `name = \"get_user\"`".to_owned(),
        "ttl" => "`ttl` takes seconds or a duration string, e.g. `ttl = 3600` or `ttl = \"1h\"`"
            .to_owned(),
        "version" => "`version` takes a whole number, e.g. `version = 2`".to_owned(),
        "lock" => {
            "`lock` takes the lease length in seconds or as a duration string, e.g. `lock = 10` or `lock = \"30s\"`"
                .to_owned()
        }
        "local" => {
            "`local` takes the in-process copy's TTL in seconds or as a duration string, e.g. `local = 30` or `local = \"30s\"`, or nothing (`local` alone: as long as the entry)"
                .to_owned()
        }
        "stale" => {
            "`stale` takes how long a value is kept past its TTL, to be served if a load fails: seconds or a duration string, e.g. `stale = 600` or `stale = \"10m\"`"
                .to_owned()
        }
        "refresh" => {
            "`refresh` takes the share of the TTL after which a hit starts a background refresh, as a percentage in a string, e.g. `refresh = \"80%\"`, or nothing (`refresh` alone: probabilistic early refresh, from the value's compute time)"
                .to_owned()
        }
        "before" => "`before` is a flag and takes no value; write `before` alone".to_owned(),
        "cache" => {
            "`cache` takes an expression naming a `Cache`, e.g. `cache = self.cache`".to_owned()
        }
        "condition" => {
            "`condition` takes a boolean expression over the arguments, e.g. `condition = id > 0`"
                .to_owned()
        }
        "unless" => {
            "`unless` takes a boolean expression over `result`, e.g. `unless = result.is_empty()`"
                .to_owned()
        }
        "value" => {
            "`value` takes an expression over the arguments or `result`, e.g. `value = user`"
                .to_owned()
        }
        "queue" => {
            "`queue` takes the queue's name as a string literal (ASCII letters, digits, `_`, `.`, `-`; 1 to 64 characters), e.g. `queue = \"users\"`"
                .to_owned()
        }
        "coalesce" => {
            "`coalesce` takes `true` or `false`, e.g. `coalesce = false`, or nothing (`coalesce` alone: the default, on)"
                .to_owned()
        }
        other => format!("`{other}` takes a value"),
    }
}

/// Why `option` is rejected by the attribute `kind`: an option of another attribute gets its
/// reason, anything else the closest option or the list of options.
pub(super) fn unknown_message(option: &str, kind: Kind) -> String {
    let attr = kind.attr();
    let misplaced = match (kind, option) {
        (Kind::Cached | Kind::Put, "keys") => Some(format!(
            "`{attr}` has one key: write `key = \"...\"` (`keys = [..]` is an option of `#[cache_evict]`)"
        )),
        (Kind::Cached, "value") => Some(
            "`value` is an option of `#[cache_put]`; `#[cached]` stores the function's result"
                .to_owned(),
        ),
        (Kind::Cached | Kind::Put, "before") => Some(format!(
            "`before` is an option of `#[cache_evict]`, not of `{attr}`"
        )),
        (Kind::Put, "stale") => Some(
            "`stale` is an option of `#[cached]`: a put has no load to fall back from; remove it"
                .to_owned(),
        ),
        (Kind::Put, "refresh") => Some(
            "`refresh` is an option of `#[cached]`: a put has no entry to reload ahead of its expiry (the `#[cached]` readers of its key refresh it); remove it"
                .to_owned(),
        ),
        (Kind::Put, "local") => Some(
            "`local` is an option of `#[cached]`: a put removes the key's in-process copies in every process, and the next read keeps the new value; remove it"
                .to_owned(),
        ),
        (Kind::Put, "lock") => Some(
            "`lock` is an option of `#[cached]`: a put always runs its function, it has no load to share; remove it"
                .to_owned(),
        ),
        (Kind::Cached | Kind::Put | Kind::Evict, "queue" | "coalesce") => Some(format!(
            "`{option}` is an option of `#[write_behind]`, not of `{attr}`"
        )),
        (Kind::WriteBehind, "keys") => Some(
            "`#[write_behind]` has one key: write `key = \"...\"` (`keys = [..]` is an option of `#[cache_evict]`)"
                .to_owned(),
        ),
        (Kind::WriteBehind, "unless") => Some(
            "`unless` is not an option of `#[write_behind]`: the call returns before the body runs, so there is no result to test; use `condition` over the arguments"
                .to_owned(),
        ),
        (Kind::WriteBehind, "cache_none") => Some(
            "`cache_none` is not an option of `#[write_behind]`, which writes its `value`, never a result; remove it"
                .to_owned(),
        ),
        (Kind::WriteBehind, "lock") => Some(
            "`lock` is an option of `#[cached]`: a write-behind call has no load to share; remove it"
                .to_owned(),
        ),
        (Kind::WriteBehind, "local") => Some(
            "`local` is an option of `#[cached]`: a write-behind call removes the key's in-process copies in every process, and the next read keeps the new value; remove it"
                .to_owned(),
        ),
        (Kind::WriteBehind, "stale") => Some(
            "`stale` is an option of `#[cached]`: a write-behind call has no load to fall back from; remove it"
                .to_owned(),
        ),
        (Kind::WriteBehind, "refresh") => Some(
            "`refresh` is an option of `#[cached]`: a write-behind call has no entry to reload ahead of its expiry (the `#[cached]` readers of its key refresh it); remove it"
                .to_owned(),
        ),
        (Kind::WriteBehind, "before") => Some(
            "`before` is an option of `#[cache_evict]`, not of `#[write_behind]`".to_owned(),
        ),
        (Kind::Evict, "key") => Some(
            "`#[cache_evict]` takes a list of keys: write `keys = [\"...\"]`".to_owned(),
        ),
        (Kind::Evict, "ttl" | "unless" | "cache_none" | "lock" | "local" | "stale" | "refresh" | "value") => Some(format!(
            "`{option}` is not an option of `#[cache_evict]`, which writes nothing; remove it"
        )),
        _ => None,
    };
    if let Some(msg) = misplaced {
        return msg;
    }
    let list = kind
        .options()
        .map(|o| format!("`{o}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match kind
        .options()
        .filter(|o| edit_distance(o, option) <= 2)
        .min_by_key(|o| edit_distance(o, option))
    {
        Some(close) => format!("unknown option `{option}`; did you mean `{close}`?"),
        None => format!("unknown option `{option}` of `{attr}`; expected one of {list}"),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert!(unknown_message("tll", Kind::Cached).contains("did you mean `ttl`"));
        assert!(unknown_message("write_behind", Kind::Cached).contains("expected one of"));
        assert!(unknown_message("refresh", Kind::Put).contains("option of `#[cached]`"));
        assert!(unknown_message("lock", Kind::Put).contains("option of `#[cached]`"));
        assert!(unknown_message("key", Kind::Evict).contains("`keys = ["));
        assert!(unknown_message("lock", Kind::WriteBehind).contains("option of `#[cached]`"));
        assert!(unknown_message("unless", Kind::WriteBehind).contains("`condition`"));
        assert!(unknown_message("queue", Kind::Put).contains("`#[write_behind]`"));
        assert!(unknown_message("queu", Kind::WriteBehind).contains("did you mean `queue`"));
    }
}
