//! The Signal and app-state keys of a session, over the key-value table.

use super::*;

#[async_trait]
impl SignalStore for PgStore {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.put(IDENTITY, "", address, &key).await
    }

    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        match self.get(IDENTITY, "", address).await? {
            Some(bytes) => bytes
                .try_into()
                .map(Some)
                .map_err(|_| StoreError::Validation("identity key is not 32 bytes".into())),
            None => Ok(None),
        }
    }

    async fn delete_identity(&self, address: &str) -> Result<()> {
        self.delete(IDENTITY, "", address).await.map(drop)
    }

    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        Ok(self.get(SESSION, "", address).await?.map(Bytes::from))
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.put(SESSION, "", address, session).await
    }

    async fn delete_session(&self, address: &str) -> Result<()> {
        self.delete(SESSION, "", address).await.map(drop)
    }

    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        let row = self
            .read_one(
                "SELECT 1 FROM cdw_wa_kv WHERE instance = $1 AND space IN ($2, $3)
                 AND (key LIKE $4 || '@%' OR key LIKE $4 || ':%') LIMIT 1",
                &[&&*self.instance, &SESSION, &IDENTITY, &user],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> Result<()> {
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value, flag) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, flag = EXCLUDED.flag",
            &[&&*self.instance, &PREKEY, &id_key(id), &record, &uploaded],
        )])
        .await
        .map(drop)
    }

    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        Ok(self.get(PREKEY, "", &id_key(id)).await?.map(Bytes::from))
    }

    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> Result<()> {
        let keys: Vec<String> = ids.iter().map(|id| id_key(*id)).collect();
        self.write(&[(
            "UPDATE cdw_wa_kv SET flag = true WHERE instance = $1 AND space = $2 AND key = ANY($3)",
            &[&&*self.instance, &PREKEY, &keys],
        )])
        .await
        .map(drop)
    }

    async fn remove_prekey(&self, id: u32) -> Result<()> {
        self.delete(PREKEY, "", &id_key(id)).await.map(drop)
    }

    async fn get_max_prekey_id(&self) -> Result<u32> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT max(key) FROM cdw_wa_kv WHERE instance = $1 AND space = $2",
                &[&&*self.instance, &PREKEY],
            )
            .await
            .map_err(db)?;
        let max: Option<String> = row.get(0);
        Ok(max.and_then(|k| k.parse().ok()).unwrap_or(0))
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        self.put(SIGNED_PREKEY, "", &id_key(id), record).await
    }

    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        self.get(SIGNED_PREKEY, "", &id_key(id)).await
    }

    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        let rows = self.scan(SIGNED_PREKEY, None).await?;
        rows.iter()
            .map(|r| {
                let key: String = r.get(1);
                let id = key
                    .parse()
                    .map_err(|_| StoreError::Validation(format!("bad signed prekey id {key}")))?;
                Ok((id, r.get(2)))
            })
            .collect()
    }

    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        self.delete(SIGNED_PREKEY, "", &id_key(id)).await.map(drop)
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.put(SENDER_KEY, "", address, record).await
    }

    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        self.get(SENDER_KEY, "", address).await
    }

    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        self.delete(SENDER_KEY, "", address).await.map(drop)
    }
}

#[async_trait]
impl AppSyncStore for PgStore {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        self.get_json(SYNC_KEY, "", &hex::encode(key_id)).await
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> Result<()> {
        let value = json(&key)?;
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value, ts)
             VALUES ($1, $2, $3, $4, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts",
            &[&&*self.instance, &SYNC_KEY, &hex::encode(key_id), &value],
        )])
        .await
        .map(drop)
    }

    async fn get_version(&self, name: &str) -> Result<HashState> {
        Ok(self.get_json(VERSION, "", name).await?.unwrap_or_default())
    }

    async fn set_version(&self, name: &str, state: HashState) -> Result<()> {
        self.put(VERSION, "", name, &json(&state)?).await
    }

    async fn put_mutation_macs(
        &self,
        name: &str,
        version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> Result<()> {
        let keys: Vec<String> = mutations
            .iter()
            .map(|m| hex::encode(&m.index_mac))
            .collect();
        let values: Vec<&[u8]> = mutations.iter().map(|m| m.value_mac.as_slice()).collect();
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, ts)
             SELECT $1, $2, $3, k, v, $6 FROM unnest($4::text[], $5::bytea[]) AS m(k, v)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts",
            &[&&*self.instance, &MAC, &name, &keys, &values, &version],
        )])
        .await
        .map(drop)
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get(MAC, name, &hex::encode(index_mac)).await
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        let keys: Vec<String> = index_macs.iter().map(hex::encode).collect();
        self.delete_where(MAC, "grp = $2 AND key = ANY($3)", &[&name, &keys])
            .await
            .map(drop)
    }

    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        self.delete_where(MAC, "grp = $2", &[&name]).await.map(drop)
    }

    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        // As the crate's SQLite store: the highest key id whose key can be read (keys arrive
        // in any order: a share, a resync, a migration). Hex keeps the byte order in "C".
        let rows = self.scan(SYNC_KEY, Some("")).await?;
        let mut readable: Vec<String> = rows
            .iter()
            .filter(|row| parse::<AppStateSyncKey>(&row.get::<_, Vec<u8>>(2)).is_ok())
            .map(|row| row.get::<_, String>(1))
            .collect();
        readable.sort_unstable();
        readable
            .pop()
            .map(hex::decode)
            .transpose()
            .map_err(|e| StoreError::Serialization(Box::new(e)))
    }
}
