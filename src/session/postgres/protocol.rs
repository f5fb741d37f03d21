//! The rest of what the client keeps: protocol state (sender keys, LID mappings, device
//! lists, tokens, sent and pending messages), message secrets and the device itself.

use super::*;

#[async_trait]
impl ProtocolStore for PgStore {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        let rows = self.scan(SENDER_KEY_DEVICE, Some(group_jid)).await?;
        Ok(rows.iter().map(|r| (r.get(1), r.get(3))).collect())
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        let devices: Vec<&str> = entries.iter().map(|(d, _)| *d).collect();
        let flags: Vec<bool> = entries.iter().map(|(_, f)| *f).collect();
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, flag)
             SELECT $1, $2, $3, d, '', f FROM unnest($4::text[], $5::bool[]) AS e(d, f)
             ON CONFLICT (instance, space, grp, key) DO UPDATE SET flag = EXCLUDED.flag",
            &[
                &&*self.instance,
                &SENDER_KEY_DEVICE,
                &group_jid,
                &devices,
                &flags,
            ],
        )])
        .await
        .map(drop)
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        self.delete_where(SENDER_KEY_DEVICE, "grp = $2", &[&group_jid])
            .await
            .map(drop)
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        let devices: Vec<&str> = device_jids.to_vec();
        self.delete_where(SENDER_KEY_DEVICE, "key = ANY($2)", &[&devices])
            .await
            .map(drop)
    }

    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        self.delete_where(SENDER_KEY_DEVICE, "true", &[])
            .await
            .map(drop)
    }

    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        let row = self
            .read_one(
                "SELECT value FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND key = $3",
                &[&&*self.instance, &LID, &lid],
            )
            .await?;
        row.map(|r| parse(r.get::<_, &[u8]>(0))).transpose()
    }

    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        // The phone number is the row's group: the most recently updated LID wins.
        let row = self
            .read_one(
                "SELECT value FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND grp = $3
                 ORDER BY ts DESC LIMIT 1",
                &[&&*self.instance, &LID, &phone],
            )
            .await?;
        row.map(|r| parse(r.get::<_, &[u8]>(0))).transpose()
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> Result<()> {
        self.put_lid_mappings(std::slice::from_ref(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        let lids: Vec<&str> = entries.iter().map(|e| e.lid.as_str()).collect();
        let phones: Vec<&str> = entries.iter().map(|e| e.phone_number.as_str()).collect();
        let updated: Vec<i64> = entries.iter().map(|e| e.updated_at).collect();
        let values = entries.iter().map(json).collect::<Result<Vec<_>>>()?;
        // A LID maps to one number: its old row (under the old number) goes first.
        self.write(&[
            (
                "DELETE FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND key = ANY($3)",
                &[&&*self.instance, &LID, &lids],
            ),
            (
                "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, ts)
                 SELECT DISTINCT ON (l) $1, $2, p, l, v, t
                 FROM unnest($3::text[], $4::text[], $5::bytea[], $6::bigint[])
                   WITH ORDINALITY AS e(l, p, v, t, n)
                 ORDER BY l, n DESC",
                &[&&*self.instance, &LID, &lids, &phones, &values, &updated],
            ),
        ])
        .await
        .map(drop)
    }

    async fn get_all_lid_mappings(&self) -> Result<Vec<LidPnMappingEntry>> {
        let rows = self.scan(LID, None).await?;
        rows.iter().map(|r| parse(r.get::<_, &[u8]>(2))).collect()
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        self.put(BASE_KEY, address, message_id, base_key).await
    }

    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> Result<bool> {
        let stored = self.get(BASE_KEY, address, message_id).await?;
        Ok(stored.is_some_and(|s| s == current_base_key))
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        self.delete(BASE_KEY, address, message_id).await.map(drop)
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.put(DEVICES, "", &record.user, &json(&record)?).await
    }

    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        self.get_json(DEVICES, "", user).await
    }

    async fn delete_devices(&self, user: &str) -> Result<()> {
        self.delete(DEVICES, "", user).await.map(drop)
    }

    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        self.get(GROUP, "", group_jid).await
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.put(GROUP, "", group_jid, blob).await
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        self.delete(GROUP, "", group_jid).await.map(drop)
    }

    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        let row = self
            .read_one(
                "SELECT value, ts, ts2 FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND key = $3",
                &[&&*self.instance, &TC_TOKEN, &jid],
            )
            .await?;
        Ok(row.map(|r| TcTokenEntry {
            token: r.get(0),
            token_timestamp: r.get(1),
            sender_timestamp: r.get(2),
        }))
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> Result<()> {
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value, ts, ts2) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts, ts2 = EXCLUDED.ts2",
            &[
                &&*self.instance,
                &TC_TOKEN,
                &jid,
                &entry.token,
                &entry.token_timestamp,
                &entry.sender_timestamp,
            ],
        )])
        .await
        .map(drop)
    }

    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        self.delete(TC_TOKEN, "", jid).await.map(drop)
    }

    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        let rows = self.scan(TC_TOKEN, None).await?;
        Ok(rows.iter().map(|r| r.get(1)).collect())
    }

    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        self.delete_where(
            TC_TOKEN,
            "NOT ((length(value) > 0 AND ts >= $2) OR (ts2 IS NOT NULL AND ts2 >= $3))",
            &[&token_cutoff, &sender_cutoff],
        )
        .await
    }

    async fn touch_tc_token_sender_timestamp(
        &self,
        jid: &str,
        sender_timestamp: i64,
    ) -> Result<()> {
        // One upsert: the sender bucket only moves forward, the token bytes stay.
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value, ts, ts2) VALUES ($1, $2, $3, '', $4, $4)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET ts2 = GREATEST(cdw_wa_kv.ts2, EXCLUDED.ts2)",
            &[&&*self.instance, &TC_TOKEN, &jid, &sender_timestamp],
        )])
        .await
        .map(drop)
    }

    async fn store_received_tc_token(
        &self,
        jid: &str,
        token: &[u8],
        token_timestamp: i64,
    ) -> Result<()> {
        // Newer wins; a placeholder never blocks the first real token; the sender bucket stays.
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value, ts) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts
             WHERE length(cdw_wa_kv.value) = 0 OR EXCLUDED.ts >= cdw_wa_kv.ts",
            &[&&*self.instance, &TC_TOKEN, &jid, &token, &token_timestamp],
        )])
        .await
        .map(drop)
    }

    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<()> {
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, ts) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts",
            &[&&*self.instance, &SENT, &chat_jid, &message_id, &payload, &now_secs()],
        )])
        .await
        .map(drop)
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        let rows = self
            .write_rows(
                "DELETE FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND grp = $3 AND key = $4
                 RETURNING value",
                &[&&*self.instance, &SENT, &chat_jid, &message_id],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete_where(SENT, "ts < $2", &[&cutoff_timestamp])
            .await
    }

    async fn store_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
        message: &[u8],
    ) -> Result<()> {
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, ts) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts",
            &[
                &&*self.instance,
                &PENDING,
                &chat,
                &joined(&[sender, id]),
                &message,
                &now_secs(),
            ],
        )])
        .await
        .map(drop)
    }

    async fn get_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.get(PENDING, chat, &joined(&[sender, id])).await
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        self.delete(PENDING, chat, &joined(&[sender, id]))
            .await
            .map(drop)
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete_where(PENDING, "ts < $2", &[&cutoff_timestamp])
            .await
    }
}

#[async_trait]
impl MsgSecretStore for PgStore {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        let chats: Vec<&str> = entries.iter().map(|e| &*e.chat).collect();
        let keys: Vec<String> = entries
            .iter()
            .map(|e| joined(&[&e.sender, &e.msg_id]))
            .collect();
        let secrets: Vec<&[u8]> = entries.iter().map(|e| e.secret.as_slice()).collect();
        let expires: Vec<i64> = entries.iter().map(|e| e.expires_at).collect();
        let message_ts: Vec<i64> = entries.iter().map(|e| e.message_ts).collect();
        // Merges as the trait says: "never" (0) wins, else the later deadline; the later
        // non-zero message time wins.
        self.write(&[(
            "INSERT INTO cdw_wa_kv AS o (instance, space, grp, key, value, ts, ts2)
             SELECT DISTINCT ON (c, k) $1, $2, c, k, s, x, m
             FROM unnest($3::text[], $4::text[], $5::bytea[], $6::bigint[], $7::bigint[])
               WITH ORDINALITY AS e(c, k, s, x, m, n)
             ORDER BY c, k, n DESC
             ON CONFLICT (instance, space, grp, key) DO UPDATE SET
               value = EXCLUDED.value,
               ts = CASE WHEN o.ts = 0 OR EXCLUDED.ts = 0 THEN 0 ELSE GREATEST(o.ts, EXCLUDED.ts) END,
               ts2 = GREATEST(o.ts2, EXCLUDED.ts2)",
            &[
                &&*self.instance,
                &MSG_SECRET,
                &chats,
                &keys,
                &secrets,
                &expires,
                &message_ts,
            ],
        )])
        .await?;
        Ok(entries.len())
    }

    async fn get_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.get(MSG_SECRET, chat, &joined(&[sender, msg_id])).await
    }

    async fn get_msg_secret_with_ts(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<(Vec<u8>, i64)>> {
        let row = self
            .read_one(
                "SELECT value, ts2 FROM cdw_wa_kv
                 WHERE instance = $1 AND space = $2 AND grp = $3 AND key = $4",
                &[
                    &&*self.instance,
                    &MSG_SECRET,
                    &chat,
                    &joined(&[sender, msg_id]),
                ],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0))))
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete_where(MSG_SECRET, "ts <> 0 AND ts <= $2", &[&cutoff_timestamp])
            .await
    }
}

#[async_trait]
impl DeviceStore for PgStore {
    async fn save(&self, device: &Device) -> Result<()> {
        self.put(DEVICE, "", "", &json(device)?).await
    }

    async fn load(&self) -> Result<Option<Device>> {
        self.get_json(DEVICE, "", "").await
    }

    async fn exists(&self) -> Result<bool> {
        Ok(self.get(DEVICE, "", "").await?.is_some())
    }

    async fn create(&self) -> Result<i32> {
        let device = json(&Device::new())?;
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value) VALUES ($1, $2, '', $3)
             ON CONFLICT DO NOTHING",
            &[&&*self.instance, &DEVICE, &device],
        )])
        .await?;
        Ok(1)
    }

    async fn resource_report(&self) -> whatsapp_rust::wacore::stats::StorageResourceReport {
        whatsapp_rust::wacore::stats::StorageResourceReport {
            memory_bytes: Some(0),
            ..Default::default()
        }
    }
}
