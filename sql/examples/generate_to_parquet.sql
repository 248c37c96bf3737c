-- Make a large, realistic input without any file or server, and lay it out as a data lake.
--   flumen run sql/examples/generate_to_parquet.sql --set ROWS=10M --set OUT=out/lake
CREATE EXTERNAL TABLE orders STORED AS GENERATE LOCATION 'orders'
  OPTIONS ('rows' '${ROWS:-1M}', 'seed' '42', 'users' '100k');

CREATE EXTERNAL TABLE users STORED AS GENERATE LOCATION 'users'
  OPTIONS ('rows' '100k', 'seed' '42');

-- One Parquet directory per order status, with the month and the buyer's country added.
COPY (
  SELECT o.*, date_trunc('month', o.created_at) AS month, u.country
  FROM orders o JOIN users u USING (user_id)
) TO '${OUT:-out/lake}/orders/' STORED AS PARQUET PARTITIONED BY (status);

SELECT status, count(*) AS orders, sum(amount) AS revenue
FROM '${OUT:-out/lake}/orders/'
GROUP BY status
ORDER BY revenue DESC;
