-- job_id: the Redis queue job (bot.queue) whose scene this is; NULL for a scene written
-- in-process (no REDIS_URL) and for every scene stored before this migration. Unique among
-- the non-null ones: a worker that took over the job of one killed right after storing it
-- gets that scene back from add_scene instead of storing it a second time.
-- dialect: sqlite
ALTER TABLE scenes ADD COLUMN job_id TEXT;
CREATE UNIQUE INDEX scenes_job_id ON scenes(job_id) WHERE job_id IS NOT NULL;
-- dialect: postgresql
ALTER TABLE scenes ADD COLUMN job_id TEXT;
CREATE UNIQUE INDEX scenes_job_id ON scenes(job_id) WHERE job_id IS NOT NULL;
-- dialect: all
