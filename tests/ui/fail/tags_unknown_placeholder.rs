use cache_runtime::cached;

#[cached(key = "user:{id}", tags = ["org:{org_id}"])]
async fn get_user(id: u64, org: u64) -> String {
    format!("{org}:{id}")
}

fn main() {}
